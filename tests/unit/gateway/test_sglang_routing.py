"""Cache-affinity routing over SGLang workers (plain Python, no I/O): rendezvous hashing of a request's first
chunk, so that independent routers (gateway replicas) agree, and a worker leaving moves only its share."""

from __future__ import annotations

import random

from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.gateway.backends.routing import AffinityRouter, rendezvous_score
from blendgate.sglang_plugin.protocol import chunk_spans

URLS = ["http://w0:30000", "http://w1:30000", "http://w2:30000"]


def chunk_sets(count: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    return [[f"{rng.getrandbits(64):016x}" for _ in range(8)] for _ in range(count)]


def test_a_request_goes_to_its_first_chunks_home_the_highest_rendezvous_score() -> None:
    router = AffinityRouter(URLS)
    for digests in chunk_sets(50):
        expected = max(URLS, key=lambda url: rendezvous_score(url, digests[0]))
        assert router.choose(digests).url == expected
        # The same first chunk, other chunks after it: the same worker (its chunk-caches are there).
        assert router.choose([digests[0], "other"]).url == expected


def test_independent_routers_with_the_same_workers_agree_whatever_each_has_seen() -> None:
    first, second = AffinityRouter(URLS), AffinityRouter(list(reversed(URLS)))
    for digests in chunk_sets(20, seed=1):  # one replica's history: load that comes and goes
        worker = first.choose(digests)
        first.started(worker)
        first.finished(worker)
    for digests in chunk_sets(200, seed=2):
        assert first.choose(digests).url == second.choose(digests).url


def test_the_requests_spread_and_a_worker_leaving_moves_only_its_share() -> None:
    router = AffinityRouter(URLS)
    sets = chunk_sets(600, seed=3)
    before = [router.choose(d).url for d in sets]
    counts = {url: before.count(url) for url in URLS}
    assert all(150 < n < 250 for n in counts.values()), counts  # about a third each
    router.mark(router.workers[URLS[2]], False, "gone")
    after = [router.choose(d).url for d in sets]
    for was, now in zip(before, after):
        if was != URLS[2]:
            assert now == was  # untouched
        else:
            assert now in URLS[:2]
    router.mark(router.workers[URLS[2]], True)
    assert [router.choose(d).url for d in sets] == before  # back where they were


def test_affinity_yields_to_load_beyond_the_imbalance_bound() -> None:
    router = AffinityRouter(URLS[:2], max_imbalance=2)
    digests = chunk_sets(1)[0]
    home = router.choose(digests)
    other = next(w for w in router.workers.values() if w is not home)
    for _ in range(3):
        router.started(home)  # three in flight on its home
    assert router.choose(digests) is other  # 3 - 0 > 2
    router.finished(home)
    assert router.choose(digests) is home  # 2 - 0 is within the bound


def test_without_chunks_work_spreads_and_unhealthy_or_excluded_workers_get_none() -> None:
    router = AffinityRouter(URLS)
    a, b, c = router.workers.values()
    chosen = []
    for _ in range(3):
        worker = router.choose([])
        router.started(worker)
        router.finished(worker)
        chosen.append(worker.url)
    assert sorted(chosen) == URLS
    router.mark(a, False, "refused")
    assert a.last_error == "refused" and a.failures == 1
    digests = chunk_sets(1, seed=4)[0]
    assert router.choose(digests) in (b, c)
    # A refused connection: the request's next-highest worker, then none.
    first = router.choose(digests)
    second = router.choose(digests, exclude={first.url})
    assert second is not first and second in (b, c)
    assert router.choose([], exclude={b.url, c.url}) is None


def test_chunk_spans_are_token_offsets_of_the_chunk_segments() -> None:
    prompt = Prompt([PromptSegment((1, 2, 3)), PromptSegment((4, 5), True), PromptSegment((6,)),
                     PromptSegment((7, 8, 9), True), PromptSegment((10,))])
    assert chunk_spans(prompt) == [3, 5, 6, 9]
    assert chunk_spans(Prompt.plain([1, 2])) == []
