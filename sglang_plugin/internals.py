"""Every SGLang internal blendgate's plugin relies on, in one place (checked against SGLang 0.5.15's wheel),
so that a version bump touches this module only. Nothing here is SGLang's public API; the plugin framework
(`sglang.srt.plugins`, entry point group "sglang.srt.plugins") and its hook registry are the extension point.

- ForwardBatch.init_new(batch: ScheduleBatch, model_runner): builds a forward pass from the scheduler's batch;
  the only place the requests (`batch.reqs`, each with `sampling_params.custom_params` and
  `origin_input_ids`) are in reach. The plugin hooks it to attach each request's chunk spans to the batch.
- ModelRunner._forward_raw(forward_batch, pp_proxy_tensors, ...): runs one forward pass and returns a
  ModelRunnerOutput(logits_output, can_run_graph). The plugin hooks it to prefill an eligible extend batch.
- ForwardBatch fields read: forward_mode, input_ids, out_cache_loc, req_pool_indices, extend_seq_lens_cpu,
  extend_prefix_lens_cpu, extend_logprob_start_lens_cpu, return_logprob, spec_info. In an extend batch the
  requests' new tokens lie back to back in input_ids and out_cache_loc (extend_seq_lens_cpu each); a request's
  first extend_prefix_lens_cpu tokens (a radix-cache match, or the earlier pieces of a prompt split by chunked
  prefill) are already in the pool, at req_to_token_pool.req_to_token[req_pool_indices[i], :prefix_len].
- ModelRunner fields read: model, token_to_kv_pool (MHATokenToKVPool.set_kv_buffer(layer, loc, k, v) with
  k, v [tokens, kv_heads, head_dim]; get_key_buffer / get_value_buffer(layer_id) [slots, kv_heads, head_dim];
  dtype), req_to_token_pool.req_to_token, model_config.hf_config, server_args.disable_radix_cache, tp_size,
  pp_size.
- Req.skip_radix_cache_insert (managers/schedule_batch.py; honoured by mem_cache/common.py's
  maybe_cache_unfinished_req and release_kv_cache): a request so marked never enters the radix tree; its KV
  slots are freed when it finishes (what SGLang does for disaggregation's warm-up requests).
- The model (LlamaForCausalLM, Qwen2ForCausalLM): parameters named model.embed_tokens.weight,
  model.layers.N.self_attn.qkv_proj.{weight,bias}, ...o_proj.weight, ...mlp.gate_up_proj.weight,
  ...mlp.down_proj.weight, ...input_layernorm.weight, ...post_attention_layernorm.weight, model.norm.weight,
  lm_head.weight (absent when tied); model.model.layers[N].self_attn.attn (the RadixAttention the pool is
  indexed by); model.model.norm; model.logits_processor(input_ids, hidden, lm_head, forward_batch), which
  takes each request's last row of `hidden` in an extend batch without input logprobs.
- LogitsProcessorOutput.customized_info: {key: [one value per request]}, which SGLang returns to the client
  in meta_info[key] (a list: one value per forward pass that set it).
"""

from __future__ import annotations

from typing import Any, Callable

TESTED_SGLANG = "0.5.15"
FORWARD_BATCH_INIT = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
MODEL_RUNNER_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner._forward_raw"
BATCH_PARAMS_ATTRIBUTE = "blendgate_requests"  # set on a ForwardBatch by the init_new hook


def register_hooks(around_init_new: Callable, around_forward_raw: Callable) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(FORWARD_BATCH_INIT, around_init_new, HookType.AROUND)
    HookRegistry.register(MODEL_RUNNER_FORWARD, around_forward_raw, HookType.AROUND)


def sglang_version() -> str:
    import sglang

    return getattr(sglang, "__version__", "unknown")


# -- the scheduler's batch ------------------------------------------------------------------------------
def is_extend_batch(schedule_batch) -> bool:
    return schedule_batch.forward_mode is not None and schedule_batch.forward_mode.is_extend()


def reqs_of(schedule_batch) -> list:
    """The batch's Req objects, in batch order (the forward batch's order too)."""
    return list(schedule_batch.reqs)


def requests_of(schedule_batch) -> list[tuple[dict | None, list[int]]]:
    """Each request's custom_params (SGLang adds a "__req__" entry, dropped here) and its prompt's token ids."""
    found = []
    for req in schedule_batch.reqs:
        custom = req.sampling_params.custom_params
        if isinstance(custom, dict):
            custom = {k: v for k, v in custom.items() if k != "__req__"}
        found.append((custom, list(req.origin_input_ids)))
    return found


# -- one forward pass ----------------------------------------------------------------------------------
def is_plain_extend(forward_batch) -> bool:
    """A prefill of new tokens only: not decode, not mixed with decode, not speculative."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return forward_batch.forward_mode == ForwardMode.EXTEND and forward_batch.spec_info is None


def extend_layout(forward_batch) -> tuple[list[int], list[int], list[int] | None]:
    """Per request: tokens computed in this pass, tokens already cached (radix prefix, earlier chunked-prefill
    pieces), and where input logprobs start (None when none are asked for)."""
    starts = forward_batch.extend_logprob_start_lens_cpu if forward_batch.return_logprob else None
    return list(forward_batch.extend_seq_lens_cpu), list(forward_batch.extend_prefix_lens_cpu), starts


def runner_output(logits_output) -> Any:
    from sglang.srt.model_executor.model_runner import ModelRunnerOutput

    return ModelRunnerOutput(logits_output=logits_output, can_run_graph=False)


def set_report(logits_output, key: str, per_request: list) -> None:
    logits_output.customized_info = {**(logits_output.customized_info or {}), key: per_request}


# -- the model runner and its model --------------------------------------------------------------------
def single_device(model_runner) -> bool:
    return model_runner.tp_size == 1 and getattr(model_runner, "pp_size", 1) == 1


def radix_cache_enabled(model_runner) -> bool:
    return not model_runner.server_args.disable_radix_cache


def can_keep_out_of_radix_cache(req) -> bool:
    """Whether this SGLang lets a request stay out of the radix tree (Req.skip_radix_cache_insert, SGLang 0.5.15)."""
    return hasattr(req, "skip_radix_cache_insert")


def keep_out_of_radix_cache(req) -> None:
    """Never insert this request's tokens into the radix tree (SGLang 0.5.15, mem_cache/common.py:
    maybe_cache_unfinished_req returns early and release_kv_cache calls RadixCache.cache_finished_req with
    is_insert=False, which frees its slots past the prefix it matched). The prefix it matched stays in the tree."""
    req.skip_radix_cache_insert = True


def pool_holds_model_dtype(model_runner) -> bool:
    """Whether the KV pool stores the model's dtype (not an fp8 KV cache), so its KV can be read back as is."""
    return model_runner.token_to_kv_pool.dtype == next(model_runner.model.parameters()).dtype


def prefix_slots(model_runner, forward_batch, index: int, length: int):
    """The pool slots of request `index`'s first `length` tokens (its cached prefix), [length] (SGLang 0.5.15
    mem_cache/memory_pool.py: ReqToTokenPool.req_to_token [requests, max_context])."""
    row = forward_batch.req_pool_indices[index]
    return model_runner.req_to_token_pool.req_to_token[row, :length].long()


def hf_config(model_runner):
    return model_runner.model_config.hf_config


def checkpoint_tensors(model_runner) -> dict[str, Any]:
    """The model's weights by name (SGLang keeps q/k/v and gate/up stacked, under qkv_proj and gate_up_proj)."""
    return {name: param.detach() for name, param in model_runner.model.named_parameters()}


def write_layer_kv(model_runner, layer: int, loc, keys, values) -> None:
    """One layer's KV ([tokens, kv_heads, head_dim], keys rotated) into the KV pool at slots `loc`."""
    attention = model_runner.model.model.layers[layer].self_attn.attn
    model_runner.token_to_kv_pool.set_kv_buffer(attention, loc, keys, values)


def read_layer_kv(model_runner, layer: int, loc):
    """One layer's KV at pool slots `loc`: keys (rotated) and values, [tokens, kv_heads, head_dim] each
    (SGLang 0.5.15 MHATokenToKVPool.get_key_buffer / get_value_buffer, by the attention layer's layer_id)."""
    layer_id = model_runner.model.model.layers[layer].self_attn.attn.layer_id
    pool = model_runner.token_to_kv_pool
    return pool.get_key_buffer(layer_id)[loc], pool.get_value_buffer(layer_id)[loc]


def logits_from_hidden(model_runner, forward_batch, last_hidden):
    """SGLang's logits for an extend batch, from each request's last-token hidden state (before the final
    norm), [requests, hidden]: the logits processor reads only each request's last row."""
    import torch

    model = model_runner.model
    rows = torch.zeros(forward_batch.input_ids.shape[0], last_hidden.shape[-1], dtype=last_hidden.dtype,
                       device=last_hidden.device)
    ends = torch.tensor(forward_batch.extend_seq_lens_cpu, device=last_hidden.device).cumsum(0) - 1
    rows[ends] = model.model.norm(last_hidden)
    return model.logits_processor(forward_batch.input_ids, rows, model.lm_head, forward_batch)
