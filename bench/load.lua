-- wrk script: POST batches of PULSE_BATCH events shaped like a site's traffic: ~2000 sessions open at
-- once per connection thread, 2-14 events each, 30% of sessions from returning users. No uuid: the
-- server makes time-ordered ones. PULSE_FORMAT picks the body: pulse's own (native), PostHog's batch,
-- Plausible's event (one a request) or Umami's (/api/batch for more than one); PULSE_SITE is the
-- project's site id (Umami's website).
local batch = tonumber(os.getenv("PULSE_BATCH") or "1")
local format = os.getenv("PULSE_FORMAT") or "native"
local site = os.getenv("PULSE_SITE") or ""
local names = {"page_view", "page_view", "page_view", "click", "signup", "purchase"}
local open_sessions = {}
local serial = 0
local prefix = tostring(math.random(1, 1000000000))
wrk.method = "POST"
wrk.path = "/api/v1/events/ingest"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("PULSE_KEY") or ""
wrk.headers["User-Agent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"

local function next_session()
  if #open_sessions < 2000 or math.random() < 0.12 then
    serial = serial + 1
    local user
    if math.random() < 0.3 then user = "u" .. math.random(1, 100000) else user = "n" .. prefix .. "-" .. serial end
    open_sessions[#open_sessions + 1] = {user, "s" .. prefix .. "-" .. serial, math.random(2, 14)}
  end
  local slot = math.random(1, #open_sessions)
  local session = open_sessions[slot]
  session[3] = session[3] - 1
  if session[3] <= 0 then
    open_sessions[slot] = open_sessions[#open_sessions]
    open_sessions[#open_sessions] = nil
  end
  return session
end

if format == "posthog" then
  wrk.path = "/batch/"
elseif format == "plausible" then
  wrk.path = "/api/event"
  wrk.headers["Content-Type"] = "text/plain"
elseif format == "umami" then
  wrk.path = batch > 1 and "/api/batch" or "/api/send"
end

local function event(i)
  local session = next_session()
  local name, page = names[math.random(#names)], math.random(1, 40)
  if format == "posthog" then
    return string.format(
      '{"event":"%s","distinct_id":"%s","properties":{"$session_id":"%s",'
      .. '"$current_url":"https://shop.example/p/%d","$referrer":"https://www.google.com/","plan":"pro","n":%d}}',
      name == "page_view" and "$pageview" or name, session[1], session[2], page, i)
  elseif format == "plausible" then
    return string.format('{"n":"%s","u":"https://shop.example/p/%d","d":"shop.example",'
      .. '"r":"https://www.google.com/","p":{"plan":"pro","n":%d}}', name == "page_view" and "pageview" or name, page, i)
  elseif format == "umami" then
    local named = name == "page_view" and "" or string.format('"name":"%s",', name)
    return string.format('{"type":"event","payload":{"website":"%s","hostname":"shop.example","url":"/p/%d",'
      .. '"referrer":"https://www.google.com/",%s"id":"%s","data":{"plan":"pro","n":%d}}}', site, page, named,
      session[1], i)
  end
  return string.format(
    '{"event":"%s","distinct_id":"%s","session_id":"%s","page_url":"https://shop.example/p/%d",'
    .. '"referrer":"https://www.google.com/","properties":{"plan":"pro","n":%d}}', name, session[1], session[2], page, i)
end

request = function()
  local parts = {}
  for i = 1, batch do
    parts[i] = event(i)
  end
  local body = table.concat(parts, ",")
  if format == "posthog" then
    body = '{"api_key":"' .. (os.getenv("PULSE_KEY") or "") .. '","batch":[' .. body .. ']}'
  elseif format == "umami" then
    if batch > 1 then body = "[" .. body .. "]" end
  elseif format ~= "plausible" then
    body = '{"events":[' .. body .. ']}'
  end
  return wrk.format(nil, nil, nil, body)
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
