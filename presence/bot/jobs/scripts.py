"""Lua scripts that must run atomically on the server.

A result is written only while its call is live and only by the worker that still owns the
request entry: check and write happen in one script, so a call that ends, or a worker that
stalled while another reclaimed its job, can't slip a stray result in between.
"""

from __future__ import annotations

# Writes a job's outcome and acknowledges its request entry, in that order, in one step: a
# worker that dies cannot leave a result unacknowledged (or an ack without its result).
# KEYS: live set, result stream, job hash, request stream
# ARGV: call_id, result json, maxlen, status, error, finished_at, ttl_s, worker, group, entry id
# -> 1 written, 0 dropped (call not live; acknowledged either way), -1 superseded: another
#    worker owns the entry now or already finished the job (nothing written, nothing acked)
WRITE_RESULT = """
local ok, pel = pcall(redis.call, 'XPENDING', KEYS[4], ARGV[9], ARGV[10], ARGV[10], 1)
if ok and #pel > 0 and pel[1][2] ~= ARGV[8] then return -1 end
if ok and #pel == 0 then
  local st = redis.call('HMGET', KEYS[3], 'status', 'worker')
  local s = st[1] or ''
  if (s == 'done' or s == 'failed' or s == 'dead') and st[2] ~= ARGV[8] then return -1 end
end
local fields = {'status', ARGV[4], 'error', ARGV[5], 'finished_at', ARGV[6], 'worker', ARGV[8]}
local written = 0
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[7])
  written = 1
else
  table.insert(fields, 'dropped')
  table.insert(fields, '1')
end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('XACK', KEYS[4], ARGV[9], ARGV[10])
return written
"""

# KEYS: job hash, cancel key, live set, result stream
# ARGV: reason, ttl_s, call_id, cancelled-result json (used when the job is still queued), maxlen
# -> 0 not cancellable (unknown or finished), 1 flagged while running, 2 cancelled while queued
CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s or (s ~= 'queued' and s ~= 'running') then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
if s == 'running' then return 1 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', 'cancelled: ' .. ARGV[1])
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'result', ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return 2
"""

# Decides, atomically, whether a delivered job may start, and marks it running if so.
# First: does this consumer still own the entry? A worker that stalled (GC pause, SIGSTOP)
# past idle_reclaim_ms may hold a stale copy that another worker has reclaimed meanwhile.
# KEYS: job hash, cancel key, live set, request stream
# ARGV: call_id, worker, now, ttl_s, max_attempts, deadline_passed ('1'/'0'), group, entry id
# -> {verdict, deliveries, previous status, detail}
START = """
local ok, pel = pcall(redis.call, 'XPENDING', KEYS[4], ARGV[7], ARGV[8], ARGV[8], 1)
if not ok or #pel == 0 or pel[1][2] ~= ARGV[2] then
  return {'not_owner', 0, '', ''}
end
local n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
local s = redis.call('HGET', KEYS[1], 'status') or ''
local c = redis.call('GET', KEYS[2])
if c then return {'cancel', n, s, c} end
if s == 'done' or s == 'failed' or s == 'dead' or s == 'cancelled' then
  return {'finished', n, s, ''}
end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then return {'not_live', n, s, ''} end
if ARGV[6] == '1' then return {'deadline', n, s, ''} end
if n > tonumber(ARGV[5]) then
  return {'dead', n, s, redis.call('HGET', KEYS[1], 'error') or ''}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3])
return {'run', n, s, ''}
"""

# While a job runs: its cancel flag, the entry's current owner, and (if still ours and asked
# to) a heartbeat: XCLAIM to ourselves resets the idle time so XAUTOCLAIM leaves it alone.
# Never claims an entry another worker has taken over.
# ARGV: group, entry id, consumer, touch ('1'/'0')
# KEYS: cancel key, request stream, job hash
# -> {cancel reason or '', owner or '', status, worker of the status}
HEARTBEAT = """
local c = redis.call('GET', KEYS[1])
local ok, pel = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[1], ARGV[2], ARGV[2], 1)
local owner = ''
if ok and #pel > 0 then owner = pel[1][2] end
if owner == ARGV[3] and ARGV[4] == '1' then
  redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
end
local st = redis.call('HMGET', KEYS[3], 'status', 'worker')
return {c or '', owner, st[1] or '', st[2] or ''}
"""
