"""One transaction of one run, committed in one round trip: a ``Commit`` program run by one Lua script.

A step decides on a snapshot of the fields it read (from Redis or from this process's cache of them), then
sends one program: *checks* — every field it read, with the value it saw — and *ops* — every write. The
script runs the checks first; if any field changed since it was read (another step of the run committed
in between, or the cache was stale) nothing is written and the current values of the checked fields come
back, so the step decides again on fresh state without another read. Otherwise every op is applied, as
one atomic unit. This is optimistic concurrency with full read-set validation: serializable, like the
WATCH/MULTI it replaces, without WATCH's extra round trips or a read per field.

The program is one flat list, sent as one msgpack blob (ARGV[1], unpacked by Redis's own cmsgpack: redis-py
packs each argument in Python, and a commit has a hundred of them; a program holding a value that is not UTF-8
goes as plain ARGV after a ``flat`` marker), read with a cursor:

  n_groups, then per group:  key#, n, n x (field, present "1"/"0", value)       -- HMGET + compare
  n_absent, then key# each                                                      -- EXISTS: must be 0
  n_ops, then per op:        opcode, key#, n_args, args...
  n_warm, then per hash:     key#, n, n x field                                 -- HMGET after the ops

``key#`` indexes KEYS (1-based). The opcodes are the ``OP_*`` constants below. When applied, returns
``{1, picked job id or false, its payload or false, its delivery count or 0, n, n values read anew for it, key#,
field, value or false, ...}`` with a triple for every *warm* field (what the next step of the run will read,
sent back now so that it reads nothing); else ``{0, key#, field, current value or false, ...}`` for every field
checked (a key found that must be absent refuses the commit the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..jobs import Picked

OP_HSET = "H"  # args: field, value, ...
OP_HDEL = "D"  # args: field, ...
OP_SET_PX = "S"  # args: value, ms (ms <= 0: no expiry)
OP_DEL = "X"  # args: key# of more keys to delete with it (one DEL)
OP_EXPIRE = "E"  # args: ms (<= 0: PERSIST)
OP_EXPIRE_NEW = "T"  # args: ms             only a key with no expiry (one this op's transaction created)
OP_EXPIRE_ANY = "A"  # args: ms, key# of more keys   as E on each, after one EXISTS of them all finds any
OP_EXTEND = "G"  # args: ms (<= 0: none)   never shortens: a key with a longer expiry (or none) keeps it
OP_EXTEND_INDEX = "K"  # args: ms (<= 0: PERSIST)  gives a key with none an expiry, else never shortens it
OP_DEFINE = "B"  # args: document, ms      SET keeping a longer expiry (or none) an earlier run gave it
OP_ZADD = "Z"  # args: score, member, ...
OP_ZREM = "z"  # args: member
OP_ENQUEUE = "Q"  # key: arq's queue; args: per job: job key#, score, payload, expires ms, job id
OP_WAKE = "W"  # args: n, cap                LPUSH n tokens, keep at most 2 x ``cap``, a day's expiry when new
OP_UNQUEUE = "U"  # key: the arq queue; args: job id, job prefix
OP_PICK = "N"  # key: the arq queue; args: now, in-progress prefix, job prefix, lock ms, how many ids to look
#                at, which of them to look at first (any number: taken modulo how many there are), retry prefix
OP_TRIM_INDEX = "I"  # key: expiry index; args: now, meta prefix, batch, key# of every index key

APPLY = r"""
local A, i = ARGV, 2
if #ARGV == 1 then A, i = cmsgpack.unpack(ARGV[1]), 1 end
local function nxt() local v = A[i]; i = i + 1; return v end
local function call_chunked(cmd, key, args, from, step)
  -- unpack() is limited to a few thousand values: send big argument lists in slices
  local n = #args
  local s = from
  while s <= n do
    local e = math.min(n, s + step - 1)
    redis.call(cmd, key, unpack(args, s, e))
    s = e + 1
  end
end

-- Reading a job a commit takes (OP_PICK) runs after the commit's writes: nothing here may raise, whatever a
-- queued job or a key holds (a planted payload, another release's), or the commit would fail with its writes made.
local function deliveries(retry_key)
  -- counted as arq counts the deliveries of the jobs it runs (its retry key, its expiry): a job delivered
  -- before (its worker may have died running it) tells its step to claim first; a key that is no count: 2
  local set = redis.pcall('SET', retry_key, '1', 'NX', 'EX', 88400)
  if type(set) == 'table' and set.ok then return 1 end
  local n = redis.pcall('INCR', retry_key)
  if type(n) == 'number' then return n end
  return 2
end
local function reread(payload)
  -- the fields the job's payload asks to be read anew ("reread": [hash key, field, ...] each, at most 16), as
  -- they are now: what its step would otherwise read in a round trip of its own. Anything odd: none
  local decoded, doc = pcall(cjson.decode, payload)
  if not decoded or type(doc) ~= 'table' or type(doc.reread) ~= 'table' or #doc.reread > 16 then return {} end
  local order, at = {}, {}  -- one HMGET a hash, in the order the hashes first appear
  for j, kf in ipairs(doc.reread) do
    if type(kf) ~= 'table' or type(kf[1]) ~= 'string' or type(kf[2]) ~= 'string' then return {} end
    if not at[kf[1]] then at[kf[1]] = {}; order[#order + 1] = kf[1] end
    local list = at[kf[1]]
    list[#list + 1] = j
  end
  local fresh = {}
  for _, k in ipairs(order) do
    local names = {}
    for n, j in ipairs(at[k]) do names[n] = doc.reread[j][2] end
    local got = redis.pcall('HMGET', k, unpack(names))
    if type(got) ~= 'table' or got.err then return {} end  -- an error (not a hash)
    for n, j in ipairs(at[k]) do fresh[j] = got[n] end
  end
  return fresh
end

local ok = true
local seen = {}
local picked = nil
for _ = 1, tonumber(nxt()) do
  local ki = nxt()
  local k = KEYS[tonumber(ki)]
  local n = tonumber(nxt())
  local fields, present, values = {}, {}, {}
  for j = 1, n do fields[j] = nxt(); present[j] = nxt(); values[j] = nxt() end
  local cur = {}
  local s = 1
  while s <= n do
    local e = math.min(n, s + 999)
    local got = redis.call('HMGET', k, unpack(fields, s, e))
    for j = s, e do cur[j] = got[j - s + 1] end
    s = e + 1
  end
  for j = 1, n do
    local c = cur[j]
    if present[j] == '1' then
      if c ~= values[j] then ok = false end
    elseif c then
      ok = false
    end
    seen[#seen + 1] = ki; seen[#seen + 1] = fields[j]; seen[#seen + 1] = c
  end
end
for _ = 1, tonumber(nxt()) do
  -- a key that must not exist (a queued job's lock: the job is running somewhere)
  if redis.call('EXISTS', KEYS[tonumber(nxt())]) == 1 then ok = false end
end
if not ok then
  local out = {0}
  for j = 1, #seen do out[#out + 1] = seen[j] end
  return out
end

for _ = 1, tonumber(nxt()) do
  local op = nxt()
  local k = KEYS[tonumber(nxt())]
  local n = tonumber(nxt())
  local a = {}
  for j = 1, n do a[j] = nxt() end
  if op == 'H' then
    call_chunked('HSET', k, a, 1, 1000)
  elseif op == 'D' then
    call_chunked('HDEL', k, a, 1, 1000)
  elseif op == 'S' then
    local ms = tonumber(a[2])
    if ms > 0 then redis.call('SET', k, a[1], 'PX', ms) else redis.call('SET', k, a[1]) end
  elseif op == 'X' then
    local more = {}
    for j = 1, n do more[j] = KEYS[tonumber(a[j])] end
    redis.call('DEL', k, unpack(more))
  elseif op == 'E' then
    local ms = tonumber(a[1])
    if ms > 0 then redis.call('PEXPIRE', k, ms) else redis.call('PERSIST', k) end
  elseif op == 'A' then
    local ms = tonumber(a[1])
    local all = {k}
    for j = 2, n do all[j] = KEYS[tonumber(a[j])] end
    if redis.call('EXISTS', unpack(all)) > 0 then
      for j = 1, #all do
        if ms > 0 then redis.call('PEXPIRE', all[j], ms) else redis.call('PERSIST', all[j]) end
      end
    end
  elseif op == 'T' then
    local ms = tonumber(a[1])
    if ms > 0 and redis.call('PTTL', k) == -1 then redis.call('PEXPIRE', k, ms) end
  elseif op == 'G' then
    local ms = tonumber(a[1])
    local left = redis.call('PTTL', k)
    if left >= 0 and (ms <= 0 or left < ms) then
      if ms <= 0 then redis.call('PERSIST', k) else redis.call('PEXPIRE', k, ms) end
    end
  elseif op == 'K' then
    local ms = tonumber(a[1])
    if ms <= 0 then
      redis.call('PERSIST', k)
    else
      local left = redis.call('PTTL', k)
      if left == -1 or (left >= 0 and left < ms) then redis.call('PEXPIRE', k, ms) end
    end
  elseif op == 'B' then
    local ms = tonumber(a[2])
    local left = redis.call('PTTL', k)
    redis.call('SET', k, a[1])
    if ms > 0 and left ~= -1 then
      if left > ms then ms = left end
      redis.call('PEXPIRE', k, ms)
    end
  elseif op == 'Z' then
    redis.call('ZADD', k, unpack(a))
  elseif op == 'z' then
    redis.call('ZREM', k, a[1])
  elseif op == 'Q' then
    -- arq's enqueue_job, inside the commit, for all the jobs a step decided (one ZADD): an id queued or
    -- running (its job key exists) is not queued again. arq also looks for a kept result; flowcraft's
    -- workers keep none (keep_result=0)
    local added = {}
    for j = 1, n, 5 do
      if redis.call('SET', KEYS[tonumber(a[j])], a[j + 2], 'NX', 'PX', a[j + 3]) then
        added[#added + 1] = a[j + 1]; added[#added + 1] = a[j + 4]
      end
    end
    if #added > 0 then call_chunked('ZADD', k, added, 1, 1000) end
  elseif op == 'W' then
    local tokens = {}
    for j = 1, tonumber(a[1]) do tokens[j] = '1' end
    local len = redis.call('LPUSH', k, unpack(tokens))
    -- trimmed back to cap once it holds twice that: a busy queue's every enqueue then costs one LPUSH
    if len > 2 * tonumber(a[2]) then redis.call('LTRIM', k, 0, tonumber(a[2]) - 1) end
    if len == #tokens then redis.call('EXPIRE', k, 86400) end
  elseif op == 'U' then
    -- a queued job whose step this commit claimed: dropped from the queue. A worker that took it already
    -- finds the step claimed (so runs nothing), or, when it had not read the job yet, no job ("expired")
    redis.call('ZREM', k, a[1])
    redis.call('DEL', a[2] .. a[1])
  elseif op == 'N' then
    -- take one of the oldest ready jobs of the queue for this worker, as arq's own pickers do: its
    -- in-progress key (SET NX, one lease long) is the lock they all respect; the job stays in the queue
    -- until finished (the oldest ready jobs are the likeliest to be running already: one MGET finds those
    -- that are not). Looked at from a random one of them on (a[6]): arq's pickers read the very oldest,
    -- and each id both go for costs the loser a round of checks
    local ids = redis.call('ZRANGEBYSCORE', k, '-inf', a[1], 'LIMIT', 0, tonumber(a[5]))
    if #ids > 0 then
      local locks = {}
      for j, id in ipairs(ids) do locks[j] = a[2] .. id end
      locks = redis.call('MGET', unpack(locks))
      local from = tonumber(a[6]) % #ids
      for step = 0, #ids - 1 do
        local j = (from + step) % #ids + 1
        local id = ids[j]
        if not locks[j] and redis.call('SET', a[2] .. id, '1', 'NX', 'PX', a[4]) then
          local payload = redis.call('GET', a[3] .. id)
          if payload then
            picked = {id, payload, deliveries(a[7] .. id), reread(payload)}
            break
          end
          redis.call('DEL', a[2] .. id)
        end
      end
    end
  elseif op == 'I' then
    -- index entries whose recorded expiry passed: dropped everywhere if their run is gone, else re-dated
    local now = tonumber(a[1])
    local idx = {}
    for j = 4, n do idx[#idx + 1] = KEYS[tonumber(a[j])] end
    local due = redis.call('ZRANGEBYSCORE', k, '-inf', now, 'LIMIT', 0, tonumber(a[3]))
    for _, run_id in ipairs(due) do
      local left = redis.call('PTTL', a[2] .. run_id)
      if left == -2 then
        for _, ik in ipairs(idx) do redis.call('ZREM', ik, run_id) end
      elseif left == -1 then
        redis.call('ZADD', k, '+inf', run_id)
      else
        redis.call('ZADD', k, now + left, run_id)
      end
    end
  else
    return redis.error_reply('flowcraft commit: unknown op ' .. tostring(op))
  end
end
local out = {1, false, false, 0, 0}
if picked then
  out[2] = picked[1]; out[3] = picked[2]; out[4] = picked[3]; out[5] = #picked[4]
  for j = 1, #picked[4] do out[5 + j] = picked[4][j] end
end
for _ = 1, tonumber(nxt()) do
  local ki = nxt()
  local n = tonumber(nxt())
  local fields = {}
  for j = 1, n do fields[j] = nxt() end
  local s = 1
  while s <= n do
    local e = math.min(n, s + 999)
    local got = redis.call('HMGET', KEYS[tonumber(ki)], unpack(fields, s, e))
    for j = s, e do out[#out + 1] = ki; out[#out + 1] = fields[j]; out[#out + 1] = got[j - s + 1] end
    s = e + 1
  end
end
return out
"""


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


@dataclass
class Commit:
    """A program for ``APPLY``: build it with the methods below, then send ``keys``/``argv``."""

    keys: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)
    _groups: dict[int, list[tuple[str, bytes | None]]] = field(default_factory=dict)
    _ops: list[bytes | str | int] = field(default_factory=list)
    n_ops: int = 0
    _warm: dict[int, list[str]] = field(default_factory=dict)
    _absent: list[int] = field(default_factory=list)

    def key(self, key: str) -> int:
        """The 1-based KEYS index of ``key``, added on first use."""
        got = self._index.get(key)
        if got is None:
            self.keys.append(key)
            got = self._index[key] = len(self.keys)
        return got

    def check(self, key: str, fld: str, raw: bytes | None) -> None:
        """The commit holds only if ``key``'s field still has ``raw`` (None: is absent)."""
        self._groups.setdefault(self.key(key), []).append((fld, raw))

    def check_all(self, key: str, checks: list[tuple[str, bytes | None]]) -> None:
        """``check`` for several fields of one hash."""
        self._groups.setdefault(self.key(key), []).extend(checks)

    def absent(self, key: str) -> None:
        """The commit holds only if ``key`` does not exist."""
        self._absent.append(self.key(key))

    def op(self, code: str, key: str, *args: bytes | str | int) -> None:
        self._ops += [code, self.key(key), len(args), *args]
        self.n_ops += 1

    def warm(self, key: str, fields: list[str]) -> None:
        """Send back these fields' values as the commit leaves them."""
        if fields:
            self._warm.setdefault(self.key(key), []).extend(dict.fromkeys(fields))

    @property
    def empty(self) -> bool:
        return not self.n_ops and not self._groups and not self._absent

    def argv(self) -> list[bytes | str | int]:
        """The program as ARGV: one msgpack blob; or, if a value is not UTF-8 (Redis's cmsgpack knows no
        binary type, so bytes travel as strings), ``flat`` followed by the program's items."""
        program = self.program()
        try:
            return [msgspec.msgpack.encode([v.decode() if type(v) is bytes else v for v in program])]
        except UnicodeDecodeError:
            return ["flat", *program]

    def program(self) -> list[bytes | str | int]:
        out: list[bytes | str | int] = [len(self._groups)]
        for ki, checks in self._groups.items():
            out += [ki, len(checks)]
            for fld, raw in checks:
                out += [fld, "0", ""] if raw is None else [fld, "1", raw]
        out.append(len(self._absent))
        out += self._absent
        out.append(self.n_ops)
        out += self._ops
        out.append(len(self._warm))
        for ki, names in self._warm.items():
            out += [ki, len(names), *names]
        return out

    def values(self, reply: list[Any]) -> list[tuple[str, str, bytes | None]]:
        """(key, field, value) triples of a reply: the current value of every field checked, from a reply
        that refused the commit; the warm fields, from one that applied it."""
        out = []
        for j in range(1 if int(reply[0]) == 0 else 5 + int(reply[4]), len(reply), 3):
            fld = reply[j + 1]
            out.append((self.keys[int(reply[j]) - 1], fld.decode() if isinstance(fld, bytes) else fld,
                        None if reply[j + 2] is None else _b(reply[j + 2])))
        return out


def picked(reply: list[Any]) -> Picked | None:
    """The job an applied commit took for its worker (``OP_PICK``), or None."""
    if int(reply[0]) != 1 or not reply[1]:
        return None
    job_id = reply[1]
    return Picked((job_id.decode() if isinstance(job_id, bytes) else job_id), reply[2], int(reply[3]),
                  [None if v is None else _b(v) for v in reply[5:5 + int(reply[4])]])
