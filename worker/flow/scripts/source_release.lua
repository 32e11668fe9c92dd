-- source_release.lua: a run lets go of its source, only if it still holds it (a run that lost the source to a
-- later claim must not free that claim).
-- KEYS[1]  the source's holder (a string: a run id)
-- ARGV[1]  the run id letting go
-- Returns  1 if released, 0 if the source was held by another run or by none.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
