"""Turning the last position's logits into the next token, as OpenAI's sampling parameters describe."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy: dividing by ~0 would only overflow.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


class Sampler:
    """Per-request sampling state: the random generator (seeded for reproducible output) and token counts."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.counts: Counter[int] = Counter()

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not self.counts or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return logits
        ids = torch.tensor(list(self.counts), device=logits.device)
        counts = torch.tensor([self.counts[i] for i in self.counts], dtype=logits.dtype, device=logits.device)
        logits = logits.clone()
        logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return logits

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the token is the logits' argmax, which sample_batch takes for a batch."""
        p = self.params
        return p.temperature < GREEDY_TEMPERATURE and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0

    def record(self, token: int) -> None:
        """Count a token chosen for this request (the penalties' counts)."""
        self.counts[token] += 1

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] for the last position."""
        logits = self._penalise(logits.float())
        p = self.params
        if p.temperature < GREEDY_TEMPERATURE:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1.0:
                probs = _top_p_filter(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.record(token)
        return token


def sample_batch(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """The next token of each request of a decode batch: logits [batch, vocab], row i for samplers[i]. The
    plain greedy rows take one argmax and one copy to the host together; the others sample one by one."""
    tokens: list[int | None] = [None] * len(samplers)
    greedy = [i for i, sampler in enumerate(samplers) if sampler.plain_greedy]
    if greedy:
        rows = logits if len(greedy) == len(samplers) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows, dim=-1).tolist()):
            samplers[i].record(token)
            tokens[i] = token
    for i, sampler in enumerate(samplers):
        if tokens[i] is None:
            tokens[i] = sampler.sample(logits[i])
    return tokens  # type: ignore[return-value]


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one: the most
    likely, even for a top_p too small for the tensor's precision, which compares as 0)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    dropped = mass_before >= top_p
    dropped[..., 0] = False
    sorted_probs[dropped] = 0.0
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum()
