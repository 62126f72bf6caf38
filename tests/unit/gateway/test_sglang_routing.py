"""Cache-affinity routing over SGLang workers (plain Python, no I/O)."""

from __future__ import annotations

from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.gateway.backends.routing import AffinityRouter
from blendgate.sglang_plugin.protocol import chunk_spans


def test_a_request_goes_to_the_worker_that_served_its_chunks() -> None:
    router = AffinityRouter(["http://a", "http://b"], max_imbalance=2)
    a, b = router.workers.values()
    router.started(a, ["x", "y"])
    router.finished(a)
    router.started(b, ["z"])
    router.finished(b)
    assert router.choose(["x", "y", "q"]) is a
    assert router.choose(["z", "q"]) is b
    assert router.choose(["q"]) in (a, b)  # nobody holds it: the least busy


def test_affinity_yields_to_load_beyond_the_imbalance_bound() -> None:
    router = AffinityRouter(["http://a", "http://b"], max_imbalance=2)
    a, b = router.workers.values()
    for _ in range(3):
        router.started(a, ["x"])  # three in flight on a
    assert router.choose(["x"]) is b  # 3 - 0 > 2
    router.finished(a)
    assert router.choose(["x"]) is a  # 2 - 0 is within the bound


def test_without_chunks_work_spreads_and_unhealthy_or_excluded_workers_get_none() -> None:
    router = AffinityRouter(["http://a", "http://b", "http://c"])
    a, b, c = router.workers.values()
    chosen = []
    for _ in range(3):
        worker = router.choose([])
        router.started(worker, [])
        router.finished(worker)
        chosen.append(worker.url)
    assert sorted(chosen) == ["http://a", "http://b", "http://c"]
    router.started(a, ["x"])
    router.mark(a, False, "refused")
    assert a.chunks == {} and a.last_error == "refused" and a.failures == 1  # a restarted worker holds nothing
    assert router.choose(["x"]) in (b, c)
    assert router.choose([], exclude={"http://b", "http://c"}) is None


def test_remembered_chunks_are_bounded_least_recent_first() -> None:
    router = AffinityRouter(["http://a"], remembered_chunks=2)
    a = router.workers["http://a"]
    router.started(a, ["x", "y"])
    router.started(a, ["x"])  # x is now the most recent
    router.started(a, ["z"])
    assert list(a.chunks) == ["x", "z"]


def test_chunk_spans_are_token_offsets_of_the_chunk_segments() -> None:
    prompt = Prompt([PromptSegment((1, 2, 3)), PromptSegment((4, 5), True), PromptSegment((6,)),
                     PromptSegment((7, 8, 9), True), PromptSegment((10,))])
    assert chunk_spans(prompt) == [3, 5, 6, 9]
    assert chunk_spans(Prompt.plain([1, 2])) == []
