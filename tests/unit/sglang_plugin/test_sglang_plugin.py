"""The SGLang plugin's decisions, on the CPU (SGLang itself runs only on the GPU: tests/gpu/test_sglang_worker.py,
tests/gpu/test_sglang_http.py): the wire format the gateway and the plugin share, which extend batches the plugin
takes over and how each request of them is prefilled, the hook that attaches the requests' chunk spans to a
forward batch, and the forward hook's bookkeeping (SGLang's side replaced by stand-ins: which requests are kept
out of the radix cache, and SGLang's forward whenever the plugin cannot prefill)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from blendgate.chunkcache.fallback import FallbackDecision, PrefillCosts
from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.sglang_plugin import plan as plans
from blendgate.sglang_plugin import worker
from blendgate.sglang_plugin.internals import BATCH_PARAMS_ATTRIBUTE
from blendgate.sglang_plugin.protocol import (
    CHUNK_CONTEXT,
    CHUNK_CONTEXT_IDS,
    CHUNK_CONTEXT_LENGTHS,
    CHUNK_SPANS,
    FIDELITY_TARGET,
    PREFILL_MODE,
    RECOMPUTE_RATIO,
    custom_params,
    prompt_of,
    report_of,
)

PROMPT = Prompt([PromptSegment((1, 2, 3)), PromptSegment((4, 5), True), PromptSegment((6,)),
                 PromptSegment((7, 8, 9), True), PromptSegment((10, 11))], mode="blend", recompute_ratio=0.3)


def test_the_prompt_survives_the_trip_to_a_worker() -> None:
    params = custom_params(PROMPT)
    assert params == {CHUNK_SPANS: [3, 5, 6, 9], PREFILL_MODE: "blend", RECOMPUTE_RATIO: 0.3}
    # Flat lists of scalars only: SGLang's msgspec check refuses nested lists in custom_params.
    assert all(not isinstance(v, list) or all(isinstance(x, int) for x in v) for v in params.values())
    again = prompt_of(PROMPT.token_ids, params)
    assert again.segments == PROMPT.segments and again.mode == "blend" and again.recompute_ratio == 0.3
    assert custom_params(Prompt.plain([1, 2])) is None
    # The quality-targeted mode's target and the chunk context travel too, and only when set.
    targeted = Prompt(PROMPT.segments, mode="blend", recompute_ratio=0.4, fidelity_target=0.85,
                      chunk_context=(21, 22, 23))
    params = custom_params(targeted)
    assert params[FIDELITY_TARGET] == 0.85 and params[CHUNK_CONTEXT] == [21, 22, 23]
    again = prompt_of(targeted.token_ids, params)
    assert again.fidelity_target == 0.85 and again.chunk_context == (21, 22, 23) and again.recompute_ratio == 0.4
    assert CHUNK_CONTEXT_LENGTHS not in params and CHUNK_CONTEXT_IDS not in params


def test_each_chunks_own_context_survives_the_trip_to_a_worker() -> None:
    own = Prompt([PROMPT.segments[0], PromptSegment((4, 5), True, context=(30, 31)), *PROMPT.segments[2:3],
                  PromptSegment((7, 8, 9), True, context=(40, 41, 42)), PROMPT.segments[4]],
                 mode="blend", recompute_ratio=0.3, chunk_context=(21, 22))
    params = custom_params(own)
    assert params[CHUNK_CONTEXT_LENGTHS] == [2, 3] and params[CHUNK_CONTEXT_IDS] == [30, 31, 40, 41, 42]
    assert all(not isinstance(v, list) or all(isinstance(x, int) for x in v) for v in params.values())
    again = prompt_of(own.token_ids, params)
    assert again.segments == own.segments and again.chunk_context == (21, 22)
    # A chunk without one (length 0) keeps the prompt's chunk_context.
    one = Prompt([*PROMPT.segments[:3], PromptSegment((7, 8, 9), True, context=(40,)), PROMPT.segments[4]],
                 mode="blend")
    assert custom_params(one)[CHUNK_CONTEXT_LENGTHS] == [0, 1]
    assert prompt_of(one.token_ids, custom_params(one)).segments == one.segments


@pytest.mark.parametrize("bad", [{CHUNK_SPANS: [3]}, {CHUNK_SPANS: [5, 3]}, {CHUNK_SPANS: [3, 99]},
                                 {CHUNK_SPANS: [-1, 2]}, {CHUNK_SPANS: [1.5, 2]}, {CHUNK_SPANS: [True, 2]},
                                 {CHUNK_SPANS: [1, 2], PREFILL_MODE: "fast"},
                                 {CHUNK_SPANS: [1, 2], RECOMPUTE_RATIO: 2},
                                 {CHUNK_SPANS: [1, 2], FIDELITY_TARGET: 0}, {CHUNK_SPANS: [1, 2], FIDELITY_TARGET: 1.5},
                                 {CHUNK_SPANS: [1, 2], FIDELITY_TARGET: "high"},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT: [1, -2]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT: "1 2"},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_LENGTHS: [1, 1], CHUNK_CONTEXT_IDS: [5, 6]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_LENGTHS: [2], CHUNK_CONTEXT_IDS: [5]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_LENGTHS: [1], CHUNK_CONTEXT_IDS: ["5"]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_LENGTHS: [1.0], CHUNK_CONTEXT_IDS: [5]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_IDS: [5]},
                                 {CHUNK_SPANS: [1, 2], CHUNK_CONTEXT_LENGTHS: [1]}])
def test_malformed_chunk_parameters_are_refused_with_the_reason(bad) -> None:
    with pytest.raises(ValueError, match="blendgate_"):
        prompt_of(list(range(11)), bad)


def test_the_report_is_read_as_sglang_and_the_stand_in_give_it() -> None:
    assert report_of({"blendgate": [{"mode": "blend"}]}) == {"mode": "blend"}
    assert report_of({"blendgate": [None, {"mode": "blend"}]}) == {"mode": "blend"}
    assert report_of({"blendgate": {"mode": "reuse"}}) == {"mode": "reuse"}
    assert report_of({}) == {} and report_of({"blendgate": [None]}) == {}


def plan(requests, **overrides):
    lens = [len(ids) for _, ids in requests]
    options = dict(extend_lens=lens, prefix_lens=[0] * len(requests), logprob_starts=None, plain_extend=True,
                   single_device=True, shares_blended_kv=False, pool_readable=True, model_type="llama")
    options.update(overrides)
    return plans.plan_batch(requests, options.pop("extend_lens"), options.pop("prefix_lens"),
                             options.pop("logprob_starts"), **options)


BLEND = (custom_params(PROMPT), PROMPT.token_ids)
PLAIN = (None, [1, 2, 3])


def test_a_batch_of_blending_requests_is_the_plugins() -> None:
    result = plan([BLEND, BLEND])
    assert [r.prompt.segments for r in result.requests] == [PROMPT.segments] * 2
    assert all(r.report is None and (r.prefix_len, r.extend_len) == (0, len(PROMPT)) for r in result.requests)
    # Logprobs of the last prompt token only (what SGLang asks for by default) need only the last row.
    assert plan([BLEND], logprob_starts=[len(PROMPT) - 1]).requests is not None


def test_batches_without_chunks_are_sglangs_and_say_nothing() -> None:
    result = plan([PLAIN, PLAIN])
    assert result.requests is None and result.reports == [None, None]
    full = ({**custom_params(PROMPT), PREFILL_MODE: "full_prefill"}, PROMPT.token_ids)
    assert plan([full]).requests is None and plan([full]).reports == [None]


@pytest.mark.parametrize("overrides, reason", [
    (dict(shares_blended_kv=True), "--disable-radix-cache"),
    (dict(plain_extend=False), "not a plain prefill"),
    (dict(single_device=False), "parallelism"),
    (dict(model_type="gemma"), "gemma"),
    (dict(prefix_lens=[4], extend_lens=[7], pool_readable=False), "fp8"),
    (dict(extend_lens=[5]), "chunked prefill"),
    (dict(logprob_starts=[0]), "input logprobs"),
])
def test_a_blend_that_cannot_happen_is_a_full_prefill_that_says_why(overrides, reason) -> None:
    result = plan([BLEND], **overrides)
    assert result.requests is None
    assert result.reports[0]["mode"] == "full_prefill" and result.reports[0]["requested_mode"] == "blend"
    assert reason in result.reports[0]["fallback"]


def test_a_mixed_batch_is_the_plugins_the_plain_request_computed_exactly_and_without_a_report() -> None:
    result = plan([PLAIN, BLEND])
    assert result.requests[0] == plans.RequestPlan(0, 3)  # no prompt: computed exactly; no report: none asked
    assert result.requests[1].prompt.segments == PROMPT.segments and result.requests[1].report is None


def test_a_cached_prefix_within_the_first_segment_blends_and_past_it_is_computed_after_it() -> None:
    # PROMPT's first segment (the system prompt, computed exactly by the blend) is its first 3 tokens.
    within = plan([BLEND, PLAIN], prefix_lens=[3, 2], extend_lens=[len(PROMPT) - 3, 1])
    assert within.requests[0].prompt is not None and within.requests[0].prefix_len == 3
    assert within.requests[1] == plans.RequestPlan(2, 1)
    assert not within.requests[0].exact_head  # the blend computes the first segment itself
    # Past it (a radix-cache match over the system prompt and the first chunk, or part of it): the blend starts
    # from that exact KV and blends the chunks after it.
    for prefix in (4, 5, 6):
        past = plan([BLEND, BLEND], prefix_lens=[prefix, 0], extend_lens=[len(PROMPT) - prefix, len(PROMPT)])
        assert past.requests[0].prompt is not None and past.requests[0].exact_head, prefix
        assert past.requests[0].prefix_len == prefix and past.requests[0].report is None
        assert past.requests[1].prompt is not None and not past.requests[1].exact_head
    # Past every chunk's start: nothing left to blend, the rest computed exactly after the exact KV.
    for prefix in (7, 10):
        past = plan([BLEND], prefix_lens=[prefix], extend_lens=[len(PROMPT) - prefix])
        assert past.requests is None and "all its chunks" in past.reports[0]["fallback"], prefix
    # An fp8 pool cannot be read back: a batch with a cached prefix is SGLang's.
    assert plan([BLEND, PLAIN], prefix_lens=[0, 2], extend_lens=[len(PROMPT), 1], pool_readable=False).requests is None


def test_a_split_prompts_pieces_are_computed_exactly_and_its_last_blends_after_them() -> None:
    first = plan([BLEND, BLEND], extend_lens=[6, len(PROMPT)])
    assert first.requests[0].prompt is None and "chunked prefill" in first.requests[0].report["fallback"]
    assert (first.requests[0].prefix_len, first.requests[0].extend_len) == (0, 6)
    assert first.requests[1].prompt is not None
    # The last piece: the earlier ones' KV, computed exactly, is its exact head; the chunks after it blend.
    last = plan([BLEND, BLEND], prefix_lens=[6, 0], extend_lens=[len(PROMPT) - 6, len(PROMPT)])
    assert last.requests[0].prompt is not None and last.requests[0].exact_head
    # A middle piece (the prompt goes on past this pass) is computed exactly.
    middle = plan([BLEND, BLEND], prefix_lens=[6, 0], extend_lens=[3, len(PROMPT)])
    assert middle.requests[0].prompt is None and "chunked prefill" in middle.requests[0].report["fallback"]


def test_bad_spans_or_a_prompt_ending_in_a_chunk_fall_back() -> None:
    bad = ({**custom_params(PROMPT), CHUNK_SPANS: [5, 3]}, PROMPT.token_ids)
    assert "bad chunk spans" in plan([bad]).reports[0]["fallback"]
    for contexts in ({CHUNK_CONTEXT_LENGTHS: [1, 5], CHUNK_CONTEXT_IDS: [1, 2]}, {CHUNK_CONTEXT_LENGTHS: [1]},
                     {CHUNK_CONTEXT_LENGTHS: [1, 1], CHUNK_CONTEXT_IDS: [1, None]}):
        malformed = plan([({**custom_params(PROMPT), **contexts}, PROMPT.token_ids)])
        assert malformed.requests is None and "blendgate_chunk_context" in malformed.reports[0]["fallback"]
        assert malformed.reports[0]["mode"] == "full_prefill"
    ends = ({CHUNK_SPANS: [9, 11], PREFILL_MODE: "blend"}, PROMPT.token_ids)
    assert "ends inside a chunk" in plan([ends]).reports[0]["fallback"]
    # Context ids past the model's vocabulary (SGLang checks the prompt's own ids, not these).
    beyond = ({**custom_params(PROMPT), CHUNK_CONTEXT_LENGTHS: [1, 1], CHUNK_CONTEXT_IDS: [3, 50]}, PROMPT.token_ids)
    assert plan([beyond], vocab_size=100).requests is not None
    refused = plan([beyond], vocab_size=50)
    assert refused.requests is None and "vocabulary size, 50" in refused.reports[0]["fallback"]


class _Mode:
    def __init__(self, extend: bool) -> None:
        self.extend = extend

    def is_extend(self) -> bool:
        return self.extend


def test_the_init_hook_attaches_spans_to_prefill_batches_only() -> None:
    def original(cls, batch, model_runner):
        return SimpleNamespace()

    def request(custom):
        return SimpleNamespace(sampling_params=SimpleNamespace(custom_params=custom), origin_input_ids=[1, 2, 3])

    spans = {CHUNK_SPANS: [0, 2], PREFILL_MODE: "blend"}
    prefill = SimpleNamespace(forward_mode=_Mode(True), reqs=[request({**spans, "__req__": object()}),
                                                               request(None)])
    forward_batch = worker.around_init_new(original, object, prefill, None)
    attached = getattr(forward_batch, BATCH_PARAMS_ATTRIBUTE)
    assert attached.params == [(spans, [1, 2, 3]), (None, [1, 2, 3])] and attached.reqs == prefill.reqs
    decode = SimpleNamespace(forward_mode=_Mode(False), reqs=prefill.reqs)
    assert not hasattr(worker.around_init_new(original, object, decode, None), BATCH_PARAMS_ATTRIBUTE)
    plain = SimpleNamespace(forward_mode=_Mode(True), reqs=[request(None)])
    assert not hasattr(worker.around_init_new(original, object, plain, None), BATCH_PARAMS_ATTRIBUTE)


def test_the_shared_tiers_codec_comes_from_the_environment(monkeypatch) -> None:
    assert (worker.PluginSettings.from_env().codec, worker.PluginSettings.from_env().codec_level) == ("raw", 0)
    monkeypatch.setenv("BLENDGATE_SGLANG_CODEC", "cachegen")
    monkeypatch.setenv("BLENDGATE_SGLANG_CODEC_LEVEL", "2")
    assert worker.PluginSettings.from_env().codec_level == 2
    monkeypatch.setenv("BLENDGATE_SGLANG_CODEC_LEVEL", "4")
    with pytest.raises(ValueError, match="cachegen"):
        worker.PluginSettings.from_env()


def test_store_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BLENDGATE_SGLANG_GPU_CACHE_GB", "0.5")
    monkeypatch.setenv("BLENDGATE_SGLANG_CHUNK_PREFIX", "none")
    assert worker.PluginSettings.from_env().probe_weights == "model"
    monkeypatch.setenv("BLENDGATE_SGLANG_PROBE_WEIGHTS", "auto")
    settings = worker.PluginSettings.from_env()
    assert settings.gpu_cache_bytes == 1 << 29 and settings.chunk_prefix == "none"
    assert settings.probe_weights == "auto"
    assert settings.warm_share == 0.1 and not settings.profile
    monkeypatch.setenv("BLENDGATE_SGLANG_WARM_SHARE", "0.25")
    monkeypatch.setenv("BLENDGATE_SGLANG_PROFILE", "1")
    assert worker.PluginSettings.from_env().warm_share == 0.25 and worker.PluginSettings.from_env().profile
    monkeypatch.setenv("BLENDGATE_SGLANG_WARM_SHARE", "0")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_WARM_SHARE"):
        worker.PluginSettings.from_env()
    monkeypatch.setenv("BLENDGATE_SGLANG_WARM_SHARE", "0.1")
    monkeypatch.setenv("BLENDGATE_SGLANG_CPU_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_CPU_CACHE_GB"):
        worker.PluginSettings.from_env()


def test_a_request_whose_blend_would_be_slower_is_computed_exactly_and_says_why() -> None:
    reasons = {id(PROMPT): None}
    slow = Prompt(PROMPT.segments, mode="reuse")
    reasons[id(slow)] = "blending 2 chunks (2 not cached) would cost about 48 tokens ..."
    requests = [plans.RequestPlan(0, len(PROMPT), PROMPT), plans.RequestPlan(0, 3),
                plans.RequestPlan(0, len(PROMPT), slow)]
    same = plans.BatchPlan(requests, [])
    assert plans.slower_than_full(same, lambda p, head: FallbackDecision(None, [True, True])) == same
    result = plans.slower_than_full(same, lambda p, head: FallbackDecision(reasons[id(p)], None))
    assert result.requests[:2] == requests[:2]  # the others still blend, or are still computed as asked
    assert result.requests[2] == plans.RequestPlan(0, len(PROMPT), report={
        "mode": "full_prefill", "requested_mode": "reuse", "fallback": reasons[id(slow)]})
    # When no request blends any more, SGLang prefills the batch and the slow one says why.
    alone = plans.slower_than_full(plans.BatchPlan(requests[1:], []),
                                   lambda p, head: FallbackDecision(reasons[id(p)], None))
    assert alone.requests is None and alone.reports == [None, result.requests[2].report]
    # With the store's view, the report says which chunks were cached: hit rates count the slow one too.
    counted = plans.slower_than_full(same, lambda p, head: FallbackDecision(reasons[id(p)], [False, True]))
    # A blend after an exact head is weighed over the chunks after it.
    heads = []
    after = plans.BatchPlan([plans.RequestPlan(5, len(PROMPT) - 5, PROMPT, exact_head=True), requests[0]], [])
    assert plans.slower_than_full(after, lambda p, head: heads.append(head) or FallbackDecision(None, [])) == after
    assert heads == [5, 0]
    assert counted.requests[2].report == {**result.requests[2].report, "hits": [False, True], "hit_count": 1,
                                          "miss_count": 1, "selection": None}


def test_fallback_costs_come_from_the_environment(monkeypatch) -> None:
    settings = worker.PluginSettings.from_env()
    assert settings.pass_cost_tokens == "auto"  # measured on the GPU
    assert settings.placement_cost_tokens == PrefillCosts().placement_tokens
    monkeypatch.setenv("BLENDGATE_SGLANG_PASS_COST_TOKENS", "500")
    assert worker.PluginSettings.from_env().pass_cost_tokens == 500.0
    for bad in ("-1", "nan", "fast"):
        monkeypatch.setenv("BLENDGATE_SGLANG_PASS_COST_TOKENS", bad)
        with pytest.raises(ValueError, match="BLENDGATE_SGLANG_PASS_COST_TOKENS"):
            worker.PluginSettings.from_env()
    monkeypatch.setenv("BLENDGATE_SGLANG_PASS_COST_TOKENS", "auto")
    monkeypatch.setenv("BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS", "-1")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS"):
        worker.PluginSettings.from_env()


def test_the_shared_redis_tier_comes_from_the_environment(monkeypatch) -> None:
    settings = worker.PluginSettings.from_env()
    assert settings.redis_url is None and settings.redis_key_prefix == "blendgate:chunk-kv"  # off, the gateway's
    monkeypatch.setenv("BLENDGATE_SGLANG_REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("BLENDGATE_SGLANG_REDIS_BUDGET_GB", "0.5")
    settings = worker.PluginSettings.from_env()
    assert settings.redis_url == "redis://cache:6379/0" and settings.redis_budget_bytes == 1 << 29
    assert settings.redis_adapt  # bandwidth adaptation on, as the gateway's chunk_cache.redis.adapt
    monkeypatch.setenv("BLENDGATE_SGLANG_REDIS_ADAPT", "0")
    assert not worker.PluginSettings.from_env().redis_adapt
    monkeypatch.setenv("BLENDGATE_SGLANG_REDIS_URL", "cache:6379")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_REDIS_URL"):
        worker.PluginSettings.from_env()


class _Runner:
    """What the forward hook needs of SGLang's model runner on the CPU: the plugin's worker already attached,
    and SGLang's own forward (`original`), which records that it ran."""

    def __init__(self, worker_state) -> None:
        self.blendgate_worker = worker_state
        self.sglang_ran = False

    def original(self, model_runner, forward_batch):
        self.sglang_ran = True
        return SimpleNamespace(logits_output=SimpleNamespace(customized_info=None))


class _Worker:
    """The plugin's worker as the hook sees it: a blend-or-full decision, and a prefill that succeeds or fails."""

    def __init__(self, fails: bool = False) -> None:
        self.warmed: list[int] = []
        self.blender = SimpleNamespace(weigh=lambda prompt, costs, head: FallbackDecision(None, []), pending_warm=0,
                                       warm_paced=lambda busy: self.warmed.append(busy))
        self.costs = None
        self.fails = fails
        self.prefilled = None

    def prefill(self, model_runner, forward_batch, requests, entered=None):
        if self.fails:
            raise RuntimeError("out of memory")
        self.prefilled = requests
        return SimpleNamespace(customized_info=None)


def _forward(monkeypatch, runner: _Runner, reqs, params, *, unknown_sglang: bool = False):
    from blendgate.sglang_plugin import internals

    def layout(forward_batch):
        if unknown_sglang:
            raise AttributeError("extend_seq_lens_cpu")
        return [len(ids) for _, ids in params], [0] * len(params), None

    monkeypatch.setattr(internals, "is_plain_extend", lambda forward_batch: True)
    monkeypatch.setattr(internals, "extend_layout", layout)
    monkeypatch.setattr(internals, "radix_cache_enabled", lambda model_runner: True)
    monkeypatch.setattr(internals, "single_device", lambda model_runner: True)
    monkeypatch.setattr(internals, "hf_config",
                        lambda model_runner: SimpleNamespace(model_type="llama", vocab_size=100))
    monkeypatch.setattr(internals, "runner_output", lambda logits_output: ("plugin", logits_output))
    forward_batch = SimpleNamespace(**{BATCH_PARAMS_ATTRIBUTE: worker.BatchRequests(params, reqs)})
    return worker.around_forward_raw(runner.original, runner, forward_batch)


def test_only_the_requests_the_plugin_blended_are_kept_out_of_the_radix_cache(monkeypatch) -> None:
    reqs = [SimpleNamespace(skip_radix_cache_insert=False) for _ in range(2)]
    state = _Worker()
    output = _forward(monkeypatch, runner := _Runner(state), reqs, [BLEND, PLAIN])
    assert output[0] == "plugin" and not runner.sglang_ran
    assert [r.prompt is not None for r in state.prefilled] == [True, False]
    assert [r.skip_radix_cache_insert for r in reqs] == [True, False]


def test_an_sglang_without_the_radix_opt_out_leaves_the_batch_to_sglang(monkeypatch) -> None:
    reqs = [SimpleNamespace(), SimpleNamespace()]  # no skip_radix_cache_insert: blended KV would enter the tree
    runner = _Runner(_Worker())
    output = _forward(monkeypatch, runner, reqs, [BLEND, PLAIN])
    assert runner.sglang_ran and not hasattr(reqs[0], "skip_radix_cache_insert")
    reports = output.logits_output.customized_info["blendgate"]
    assert "--disable-radix-cache" in reports[0]["fallback"] and reports[1] is None


def test_a_failed_prefill_or_an_unknown_sglang_is_served_by_sglang(monkeypatch) -> None:
    reqs = [SimpleNamespace(skip_radix_cache_insert=False) for _ in range(2)]
    runner = _Runner(_Worker(fails=True))
    output = _forward(monkeypatch, runner, reqs, [BLEND, PLAIN])
    assert runner.sglang_ran and not reqs[0].skip_radix_cache_insert
    reports = output.logits_output.customized_info["blendgate"]
    assert reports[0]["fallback"] == "blending failed: out of memory" and reports[1] is None
    runner = _Runner(_Worker())
    output = _forward(monkeypatch, runner, reqs, [BLEND, PLAIN], unknown_sglang=True)
    assert runner.sglang_ran and output.logits_output.customized_info is None


def test_after_a_pass_sglang_ran_the_plugin_may_compute_a_queued_chunk() -> None:
    state = _Worker()
    runner = _Runner(state)
    decode_step = SimpleNamespace()  # no blendgate requests attached: SGLang's own pass
    worker.around_forward_raw(runner.original, runner, decode_step)
    assert runner.sglang_ran and state.warmed == []  # nothing queued
    state.blender.pending_warm = 3
    worker.around_forward_raw(runner.original, runner, decode_step)
    assert state.warmed == [True]  # one paced chance a pass: requests are behind every pass
    for state in (None, False):  # the plugin failed to start, or has not started: nothing to warm
        worker.around_forward_raw(_Runner(state).original, _Runner(state), decode_step)
