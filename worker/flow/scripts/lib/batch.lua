-- lib/batch.lua: many keys or fields in one command, for the scripts that touch every image of a chunk or a call.

-- One command over a list of any length: run with `head` (a key, or false for none) and the list's values a
-- thousand at a time (Lua's unpack gives at most ~8,000 values; a chunk may hold 10,000 images); the answers
-- that are lists are joined in order. An empty list sends nothing. Slices of a thousand keep the field-value
-- pairs of an HSET whole.
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

-- The claims of n images, each image's two claim keys at KEYS[4i + a] and KEYS[4i + b] (its own and its
-- content's, the same key when it has one claim), read with one MGET, each key once: key -> value, false when
-- absent. The script keeps this view as it writes: two copies of one content share a claim.
local function read_claims(n, a, b)
  local keys, seen = {}, {}
  for i = 1, n do
    for _, key in ipairs({KEYS[4 * i + a], KEYS[4 * i + b]}) do
      if not seen[key] then
        seen[key] = true
        table.insert(keys, key)
      end
    end
  end
  local claims = {}
  local values = sliced('MGET', false, keys)
  for i, key in ipairs(keys) do claims[key] = values[i] end
  return claims
end
