"""The local engine against transformers' own generate() (its scheduler: test_scheduler.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from blendgate.engine.engine import LocalEngine
from blendgate.engine.runner import HFModelRunner, LlamaRunner
from blendgate.engine.sampling import SamplingParams


def run_engine(engine: LocalEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        return [event.token_id async for event in engine.submit(prompt, params)]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(main())


@pytest.fixture(scope="module", params=[LlamaRunner, HFModelRunner])
def engine(loaded_model, request):
    engine = LocalEngine(request.param(loaded_model), max_context_tokens=loaded_model.max_context_tokens,
                         stop_token_ids=loaded_model.eos_token_ids, max_running=2, max_waiting=8)
    yield engine
    engine.shutdown()


def test_greedy_generation_matches_transformers_generate(engine, loaded_model) -> None:
    tokenizer = loaded_model.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("What is the capital of France?", "Name three colours.", "What is 2 + 2?")]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    # Three prompts over two slots: interleaved steps and a waiting request, all at once.
    ours = run_engine(engine, prompt_ids, params)
    for ids, generated in zip(prompt_ids, ours):
        with torch.inference_mode():
            reference = loaded_model.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                                    eos_token_id=sorted(loaded_model.eos_token_ids))
        expected = reference[0, len(ids):].tolist()
        assert generated == expected
    assert engine.stats() == {"running": 0, "waiting": 0}


def test_prompt_over_the_context_is_refused_before_queueing(engine) -> None:
    async def submit():
        engine.submit([1] * engine.max_context_tokens, SamplingParams(max_new_tokens=1))

    with pytest.raises(Exception, match="context holds"):
        asyncio.run(submit())


def test_a_model_that_fails_to_load_reports_it_and_refuses_requests(tmp_path) -> None:
    from blendgate.gateway.backends.base import RequestContext
    from blendgate.gateway.backends.local import LocalBackend
    from blendgate.gateway.backends.request import BackendRequest
    from blendgate.gateway.config import LocalModelConfig
    from blendgate.gateway.errors import GatewayError
    from blendgate.gateway.schemas import ChatCompletionRequest

    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a folder with no weights
    backend = LocalBackend(LocalModelConfig(name="broken", path=tmp_path), cache_dir=tmp_path,
                           max_running=1, max_waiting=1)
    request = ChatCompletionRequest(model="broken", messages=[{"role": "user", "content": "hi"}])

    async def scenario() -> GatewayError:
        await backend.start()
        await backend.wait_ready()
        with pytest.raises(GatewayError) as raised:
            await backend.stream(BackendRequest(request, "t"), RequestContext()).__anext__()
        return raised.value

    error = asyncio.run(scenario())
    assert backend.status()["state"] == "failed"
    assert error.status == 503 and error.code == "model_unavailable"


def test_a_kv_pool_too_small_for_the_context_fails_the_model_with_its_reason(model_cache_dir) -> None:
    from blendgate.gateway.backends.local import LocalBackend
    from blendgate.gateway.config import LocalModelConfig

    config = LocalModelConfig(name="small-pool", max_context_tokens=256, kv_pool_tokens=128)
    backend = LocalBackend(config, cache_dir=model_cache_dir, max_running=2, max_waiting=2)

    async def scenario() -> None:
        await backend.start()
        await backend.wait_ready()

    asyncio.run(scenario())
    status = backend.status()
    assert status["state"] == "failed" and "cannot hold one request of the 256-token context" in status["error"]


def test_a_backend_part_still_loading_or_failed_is_a_503_saying_which() -> None:
    from blendgate.gateway.backends.base import loaded_or_503
    from blendgate.gateway.errors import GatewayError

    assert loaded_or_503("tokenizer", "m", None, "loading") == "tokenizer"
    with pytest.raises(GatewayError) as loading:
        loaded_or_503(None, "m", None, "loading its tokenizer")
    assert loading.value.status == 503 and loading.value.code == "model_loading"
    assert "still loading its tokenizer; retry shortly" in loading.value.message
    with pytest.raises(GatewayError) as failed:
        loaded_or_503(None, "m", "no such file", "loading")
    assert failed.value.code == "model_unavailable" and "m failed to load: no such file" in failed.value.message


@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-30, 0.5, 1.0])
def test_top_p_keeps_the_most_likely_token_however_small_it_is(top_p: float) -> None:
    """A top_p below float32's smallest number compared as 0 and dropped every token: NaN probabilities, a 503
    engine_error. The most likely token is always kept."""
    from blendgate.engine.sampling import Sampler

    logits = torch.tensor([0.0, 3.0, 1.0, -2.0])
    sampler = Sampler(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=top_p, seed=7), torch.device("cpu"))
    tokens = {sampler.sample(logits) for _ in range(20)}
    assert tokens == {1} if top_p < 0.5 else tokens <= {0, 1, 2, 3}


def test_a_decode_batch_samples_each_row_by_its_own_request_settings() -> None:
    """sample_batch: the plain greedy rows by one argmax, the others (penalties, temperature) one by one; every
    row's token counted for its request's penalties."""
    from blendgate.engine.sampling import Sampler, sample_batch

    cpu = torch.device("cpu")
    greedy = Sampler(SamplingParams(max_new_tokens=4, temperature=0.0), cpu)
    penalised = Sampler(SamplingParams(max_new_tokens=4, temperature=0.0, presence_penalty=5.0), cpu)
    sampled = Sampler(SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1e-9, seed=3), cpu)
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 2.0], [4.0, 0.0, 1.0]])
    assert sample_batch([greedy, penalised, sampled], logits) == [1, 1, 0]
    assert sample_batch([greedy, penalised, sampled], logits) == [1, 2, 0]  # token 1 penalised now
    assert greedy.counts == {1: 2} and penalised.counts == {1: 1, 2: 1}
