-- wrk script: POST batches of PULSE_BATCH events shaped like a site's traffic: ~2000 sessions open at
-- once per connection thread, 2-14 events each, 30% of sessions from returning users. No uuid: the
-- server makes time-ordered ones. PULSE_FORMAT picks the body: pulse's own (native), PostHog's batch,
-- Plausible's event (one a request) or Umami's (/api/batch for more than one); PULSE_SITE is the
-- project's site id (Umami's website). PULSE_SHAPE=busy sends a busy site's traffic instead: each event a random
-- user of 100,000 and a random session of 200,000, one of 1,000 user agents a request, 8 pages, 5 referrers,
-- the same for the same PULSE_SEED (each wrk thread seeded apart).
local batch = tonumber(os.getenv("PULSE_BATCH") or "1")
local format = os.getenv("PULSE_FORMAT") or "native"
local site = os.getenv("PULSE_SITE") or ""
local names = {"page_view", "page_view", "page_view", "click", "signup", "purchase"}
local open_sessions = {}
local serial = 0
local prefix = tostring(math.random(1, 1000000000))
local shape = os.getenv("PULSE_SHAPE") or "site"
local referrers = {"https://www.google.com/", "https://news.ycombinator.com/item", "https://t.co/x",
                   "https://www.bing.com/search", "https://duckduckgo.com/"}
local agent_count = 1000
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  if shape == "busy" then
    math.randomseed(tonumber(os.getenv("PULSE_SEED") or "1") * 1000 + (thread_number or 1))
  end
end

-- one of 1,000 user agents: Chrome, Firefox and Safari on a few systems, each in many versions
local function agent()
  local n = math.random(0, agent_count - 1)
  local kind, version = n % 4, 60 + math.floor(n / 4) % 250
  if kind == 0 then
    return string.format("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
      .. "Chrome/%d.0.%d.0 Safari/537.36", version, n)
  elseif kind == 1 then
    return string.format("Mozilla/5.0 (X11; Linux x86_64; rv:%d.0) Gecko/20100101 Firefox/%d.%d", version, version, n)
  elseif kind == 2 then
    return string.format("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
      .. "Version/%d.%d Safari/605.1.15", version % 20 + 1, n)
  end
  return string.format("Mozilla/5.0 (Linux; Android 14; Pixel %d) AppleWebKit/537.36 (KHTML, like Gecko) "
    .. "Chrome/%d.0.%d.0 Mobile Safari/537.36", n % 9 + 1, version, n)
end
wrk.method = "POST"
wrk.path = "/api/v1/events/ingest"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("PULSE_KEY") or ""
wrk.headers["User-Agent"] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"

local function busy_session()
  return {"u" .. math.random(1, 100000), "s" .. math.random(1, 200000)}
end

local function next_session()
  if shape == "busy" then return busy_session() end
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
  local referrer = "https://www.google.com/"
  if shape == "busy" then
    page, referrer = math.random(1, 8), referrers[math.random(#referrers)]
  end
  if format == "posthog" then
    return string.format(
      '{"event":"%s","distinct_id":"%s","properties":{"$session_id":"%s",'
      .. '"$current_url":"https://shop.example/p/%d","$referrer":%q,"plan":"pro","n":%d}}',
      name == "page_view" and "$pageview" or name, session[1], session[2], page, referrer, i)
  elseif format == "plausible" then
    return string.format('{"n":"%s","u":"https://shop.example/p/%d","d":"shop.example",'
      .. '"r":%q,"p":{"plan":"pro","n":%d}}', name == "page_view" and "pageview" or name, page, referrer, i)
  elseif format == "umami" then
    local named = name == "page_view" and "" or string.format('"name":"%s",', name)
    return string.format('{"type":"event","payload":{"website":"%s","hostname":"shop.example","url":"/p/%d",'
      .. '"referrer":%q,%s"id":"%s","data":{"plan":"pro","n":%d}}}', site, page, referrer,
      named, session[1], i)
  end
  return string.format(
    '{"event":"%s","distinct_id":"%s","session_id":"%s","page_url":"https://shop.example/p/%d",'
    .. '"referrer":%q,"properties":{"plan":"pro","n":%d}}', name, session[1], session[2], page, referrer, i)
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
  if shape == "busy" then
    local headers = {}
    for k, v in pairs(wrk.headers) do headers[k] = v end
    headers["User-Agent"] = agent()
    return wrk.format(nil, nil, headers, body)
  end
  return wrk.format(nil, nil, nil, body)
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
