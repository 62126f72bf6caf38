"""The gateway's Prometheus series (served at /metrics) and what is built from them, one responsibility a
module:

- series.py: GatewayMetrics, the series recorded per request (from RequestContext, its PrefillReport and
  RagReport);
- live.py: LiveStateCollector, series read from live state at scrape time (chunk-cache tiers, queue depth);
- admin_stats.py: the admin API's figures, from the registry's samples (the same samples /metrics prints, so
  the two never disagree);
- middleware.py: RequestCounter, the ASGI middleware counting every HTTP request.

One CollectorRegistry (state.AppState.registry) holds everything, with the semantic cache's own series
(semcache/metrics.py).
"""
