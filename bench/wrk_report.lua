-- wrk script of the gateway bench: no per-request Lua (wrk's fast path stays on);
-- at the end it prints one machine-readable line that bench/load.py parses.
done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"connect_errors\":%d,\"read_errors\":%d,\"write_errors\":%d,\"status_errors\":%d,\"timeouts\":%d," ..
    "\"lat_mean_us\":%.2f,\"lat_stdev_us\":%.2f,\"lat_p50_us\":%d,\"lat_p90_us\":%d,\"lat_p99_us\":%d," ..
    "\"lat_p999_us\":%d,\"lat_max_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency.mean, latency.stdev, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
