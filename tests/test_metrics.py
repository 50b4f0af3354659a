"""/metrics exposition: request counts and latency histograms kept as plain
numbers on the hot path, rendered in the Prometheus text format on scrape."""

from __future__ import annotations

from ringkv.metrics import NodeMetrics


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_requests_latency_buckets_and_coordination_on_scrape() -> None:
    metrics = NodeMetrics("n1")
    for seconds in (0.0005, 0.0006, 0.003, 20.0):  # le is inclusive; 20 s is past every bucket
        metrics.observe_request("get", "QUORUM", 200, seconds)
    metrics.observe_request("put", "default", 503, 0.01)
    metrics.coordinated_by_replica(True)
    metrics.coordinated_by_replica(True)
    metrics.coordinated_by_replica(False)
    got = samples(metrics.render().decode())
    assert got['ringkv_requests_total{consistency="QUORUM",op="get",status="200"}'] == 4
    assert got['ringkv_requests_total{consistency="default",op="put",status="503"}'] == 1
    bucket = 'ringkv_request_latency_seconds_bucket{{consistency="QUORUM",le="{}",op="get"}}'
    assert got[bucket.format("0.0005")] == 1
    assert got[bucket.format("0.001")] == 2
    assert got[bucket.format("0.005")] == 3
    assert got[bucket.format("10.0")] == 3
    assert got[bucket.format("+Inf")] == 4
    assert got['ringkv_request_latency_seconds_count{consistency="QUORUM",op="get"}'] == 4
    assert abs(got['ringkv_request_latency_seconds_sum{consistency="QUORUM",op="get"}']
               - 20.0041) < 1e-9
    assert got['ringkv_coordinated_keys_total{replica="true"}'] == 2
    assert got['ringkv_coordinated_keys_total{replica="false"}'] == 1
