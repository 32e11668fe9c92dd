-- sliced.lua: one command over a list of any length: run with `head` (a key, or false for none) and the list's
-- values a thousand at a time (Lua's unpack gives at most ~8,000 values; a chunk may hold 10,000 images); the
-- answers that are lists are joined in order. An empty list sends nothing. Slices of a thousand keep the
-- field-value pairs of an HSET whole.
local function sliced(command, head, list)
  local answers = {}
  for first = 1, #list, 1000 do
    local last = math.min(#list, first + 999)
    local part
    if head then part = redis.call(command, head, unpack(list, first, last))
    else part = redis.call(command, unpack(list, first, last)) end
    if type(part) == 'table' then
      for i = 1, #part do answers[#answers + 1] = part[i] end
    end
  end
  return answers
end
