"""One video across several processes: the DiT's tokens split by sequence (Ulysses × ring), CFG on top.

Every rank holds the whole DiT and runs the same sampler loop on the same latents (SPMD); only the
DiT's forward is split. Ranks are laid out as `cfg × ring × ulysses`, ulysses fastest:

- `cfg` (1 or 2): with 2, the first half of the ranks runs the conditional pass of each guidance
  step, the second half the unconditional one; the two predictions are then swapped (one all-gather)
  and every rank applies the same guidance and sampler step.
- `ulysses`: the ranks of a Ulysses group hold consecutive token shards. Before self-attention one
  all-to-all turns (their tokens, all heads) into (the group's tokens, heads / ulysses); the one after
  turns it back. The degree must divide the heads (12 for the 1.3B model).
- `ring`: the Ulysses groups' token blocks are joined over the ring group: each rank's keys and values
  are all-gathered (the all-gather form of context parallelism: diffusers' `rotate_method="allgather"`,
  Llama 3's), and its queries attend to all of them at once, so any attention kernel (FA3 too) runs it
  exactly.

Everything else in a Wan block (projections, norms, cross-attention to the 512-row prompt, the FFN)
is per token, so it runs on the rank's shard as it is. Shards are as even as the token count allows
(`token_shards`): any size and frame count splits, and ranks differ by at most one token.

The RoPE table and block 0's input are split by forward hooks and `proj_out`'s output is gathered by
one, so diffusers' forward runs unchanged; the attention's communication is one opaque custom op,
which regional compilation keeps whole. Nothing here knows about Ray: `join` takes a rank and rank 0's
address, whoever started the processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CFG_DEGREES = (1, 2)
# Longer than any single collective can take in a healthy team (a step's slowest rank at 832*480*81 on
# the CPU included); after it a stuck collective fails instead of hanging the replica forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """How many processes one video's DiT runs on, and how they share the work."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in CFG_DEGREES:
            raise ValueError(f"parallel.cfg must be 1 or 2 (the two branches of guidance), got {self.cfg}")
        for name in ("ulysses", "ring"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.cfg * self.sequence_degree

    def check_heads(self, heads: int) -> None:
        """A Ulysses degree must split the attention heads evenly: a start-up error naming the allowed degrees."""
        if heads % self.ulysses:
            raise ValueError(f"parallel.ulysses = {self.ulysses} does not divide the model's {heads} attention heads; "
                             f"allowed: {', '.join(map(str, divisors(heads)))} (or use ring for the rest)")

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(cfg index, ring index, ulysses index) of `rank`."""
        cfg_index, within = divmod(rank, self.sequence_degree)
        ring_index, ulysses_index = divmod(within, self.ulysses)
        return cfg_index, ring_index, ulysses_index

    def describe(self) -> dict[str, int]:
        return {"cfg": self.cfg, "ulysses": self.ulysses, "ring": self.ring, "world_size": self.world_size}


def token_shards(tokens: int, parts: int) -> list[int]:
    """Sizes of `parts` consecutive shards of `tokens`, the first `tokens % parts` one longer (torch.tensor_split's)."""
    base, extra = divmod(tokens, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class ParallelGroups:
    """This process's place in a `ParallelLayout` and the process groups it talks over.

    Data (activations, predictions) goes over the default backend: NCCL between GPUs, gloo on CPUs.
    Decisions every rank must take together (stop the job?) go over a gloo group, so asking never
    waits for the GPU.
    """

    def __init__(self, layout: ParallelLayout, rank: int, device: torch.device):
        self.layout, self.rank, self.device = layout, rank, device
        self.cfg_index, self.ring_index, self.ulysses_index = layout.coordinates(rank)
        self.sequence_index = self.ring_index * layout.ulysses + self.ulysses_index  # this rank's token shard
        self.tokens = 0  # of the forward in progress: set where the RoPE table is split, read by attention
        # dist.new_group must be called by every rank for every group, in the same order.
        self.ulysses = self.ring = self.sequence = self.cfg = None
        for cfg_index in range(layout.cfg):
            first = cfg_index * layout.sequence_degree
            sequence = self._new_group(range(first, first + layout.sequence_degree), self.cfg_index == cfg_index)
            self.sequence = sequence or self.sequence
            for ring_index in range(layout.ring):
                start = first + ring_index * layout.ulysses
                group = self._new_group(range(start, start + layout.ulysses), rank in range(start, start + layout.ulysses))
                self.ulysses = group or self.ulysses
            for ulysses_index in range(layout.ulysses):
                members = range(first + ulysses_index, first + layout.sequence_degree, layout.ulysses)
                self.ring = self._new_group(members, rank in members) or self.ring
        for within in range(layout.sequence_degree):
            members = range(within, layout.world_size, layout.sequence_degree)
            self.cfg = self._new_group(members, rank in members) or self.cfg
        self.control = dist.new_group(list(range(layout.world_size)), backend="gloo")

    @staticmethod
    def _new_group(members: range, mine: bool):
        group = dist.new_group(list(members))
        return group if mine else None

    @property
    def branch(self) -> str | None:
        """The guidance branch this rank computes ("cond" or "uncond") when cfg = 2, else None (both)."""
        if self.layout.cfg == 1:
            return None
        return "cond" if self.cfg_index == 0 else "uncond"

    def agree_with_rank0(self, should_cancel: Callable[[], bool] | None) -> bool:
        """Rank 0's answer to `should_cancel`, on every rank: a decision all ranks act on at the same step."""
        vote = torch.tensor([int(self.rank == 0 and should_cancel is not None and should_cancel())], dtype=torch.int32)
        dist.broadcast(vote, src=0, group=self.control)
        return bool(vote.item())

    def exchange_branches(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's branch's prediction -> (unconditional, conditional), the same on every rank."""
        both = [torch.empty_like(prediction) for _ in range(self.layout.cfg)]
        dist.all_gather(both, prediction.contiguous(), group=self.cfg)
        cond, uncond = both
        return uncond, cond

    # -- the sequence split ----------------------------------------------------------------------

    def shard_sizes(self, tokens: int) -> list[int]:
        return token_shards(tokens, self.layout.sequence_degree)

    def my_shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's consecutive slice of `x`'s tokens along `dim`."""
        sizes = self.shard_sizes(x.shape[dim])
        start = sum(sizes[: self.sequence_index])
        return x.narrow(dim, start, sizes[self.sequence_index])

    def gather_tokens(self, shard: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's shard along `dim` -> the whole sequence, on every rank of the sequence group."""
        sizes = self.shard_sizes(self.tokens)
        return _all_gather_uneven(shard, sizes, dim, self.sequence)

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend) -> torch.Tensor:
        """Self-attention of this rank's token shard [B, n, H, D] over the whole sequence.

        Ulysses: (my tokens, all heads) -> (my Ulysses group's tokens, my heads); ring: keys and values
        of every Ulysses group's block; `attend(q, k, v)` on [B, L, H, D]; then back to my tokens.
        """
        sizes = self.shard_sizes(self.tokens)
        ulysses = self.layout.ulysses
        block_sizes = [sum(sizes[r * ulysses:(r + 1) * ulysses]) for r in range(self.layout.ring)]
        group_sizes = sizes[self.ring_index * ulysses:(self.ring_index + 1) * ulysses]
        query, key, value = (_heads_to_tokens(x, group_sizes, self.ulysses) for x in (query, key, value))
        if self.layout.ring > 1:
            key = _all_gather_uneven(key, block_sizes, 1, self.ring)
            value = _all_gather_uneven(value, block_sizes, 1, self.ring)
        out = attend(query, key, value)
        return _tokens_to_heads(out, group_sizes, self.ulysses_index, self.ulysses)


def _heads_to_tokens(x: torch.Tensor, group_sizes: list[int], group) -> torch.Tensor:
    """[B, n_mine, H, D] -> [B, sum(group_sizes), H / U, D]: all-to-all over the Ulysses group."""
    parts = len(group_sizes)
    if parts == 1:
        return x
    batch, tokens, heads, dim = x.shape
    send = x.reshape(batch, tokens, parts, heads // parts, dim).permute(2, 1, 0, 3, 4).reshape(parts * tokens, -1)
    received = send.new_empty(sum(group_sizes), send.shape[1])
    dist.all_to_all_single(received, send.contiguous(), output_split_sizes=group_sizes,
                           input_split_sizes=[tokens] * parts, group=group)
    return received.reshape(-1, batch, heads // parts, dim).transpose(0, 1)


def _tokens_to_heads(x: torch.Tensor, group_sizes: list[int], index: int, group) -> torch.Tensor:
    """The inverse of `_heads_to_tokens`: [B, sum(group_sizes), H / U, D] -> [B, group_sizes[index], H, D]."""
    parts = len(group_sizes)
    if parts == 1:
        return x
    batch, _, local_heads, dim = x.shape
    mine = group_sizes[index]
    send = x.transpose(0, 1).reshape(x.shape[1], -1).contiguous()
    received = send.new_empty(parts * mine, send.shape[1])
    dist.all_to_all_single(received, send, output_split_sizes=[mine] * parts, input_split_sizes=group_sizes, group=group)
    return received.reshape(parts, mine, batch, local_heads, dim).permute(2, 1, 0, 3, 4).reshape(batch, mine, parts * local_heads, dim)


def _all_gather_uneven(x: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
    """Concatenate every member's `x` along `dim`, member i holding sizes[i] there (padded to the longest to travel)."""
    if len(sizes) == 1:
        return x
    longest = max(sizes)
    padded = x
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)


# -- the process team and the DiT's split -------------------------------------------------------


_team: ParallelGroups | None = None  # the team this process joined: the attention op's (custom ops take no Python objects)


def join(layout: ParallelLayout, rank: int, address: str, device: torch.device) -> ParallelGroups:
    """Join the team at `address` (tcp://host:port, rank 0's) as `rank`; every rank calls this at the same time."""
    global _team
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL's communicators bind to the current GPU; a bare "cuda" means that one
        torch.cuda.set_device(device if device.index is not None else torch.cuda.current_device())
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=layout.world_size, timeout=COLLECTIVE_TIMEOUT)
    _team = ParallelGroups(layout, rank, device)
    log.info("joined a %s team at %s as rank %d of %d (%s)", backend, address, rank, layout.world_size, layout.describe())
    return _team


def leave() -> None:
    """Leave the team, so that this process may join another.

    After a barrier: a rank that closed its connections while a peer was still reading its last
    message would abort that peer (gloo's transport thread does not survive a reset connection).
    """
    global _team
    if _team is not None:
        dist.barrier(group=_team.control)
    _team = None
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.library.custom_op("wan_t2v::sequence_parallel_attention", mutates_args=())
def sequence_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """Self-attention of this rank's tokens [B, n, H, D] over the team's whole sequence, by diffusers'
    attention `backend`; opaque to torch.compile, which cannot trace the collectives inside."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    kernel = AttentionBackendName(backend)
    return _team.attention(query, key, value, lambda q, k, v: dispatch_attention_fn(q, k, v, backend=kernel))


@sequence_parallel_attention.register_fake
def _sequence_parallel_attention_shape(query, key, value, backend):
    return torch.empty_like(query)


def split_sequence(transformer: torch.nn.Module, team: ParallelGroups) -> None:
    """Make `transformer`'s forward run on `team`'s token shard of each video (see the module's docstring).

    The RoPE table and block 0's input are cut to this rank's tokens, self-attention attends across the
    team, and `proj_out`'s output is gathered, so the forward still returns the whole prediction.
    """
    team.layout.check_heads(transformer.config.num_attention_heads)

    def split_rope(module, args, output):
        cos, sin = output
        team.tokens = cos.shape[1]
        return team.my_shard(cos, 1), team.my_shard(sin, 1)

    def split_input(module, args):
        return (team.my_shard(args[0], 1), *args[1:])

    def gather_output(module, args, output):
        return team.gather_tokens(output, 1)

    transformer.rope.register_forward_hook(split_rope)
    transformer.blocks[0].register_forward_pre_hook(split_input)
    transformer.proj_out.register_forward_hook(gather_output)
    split = [module.processor for module in transformer.modules() if hasattr(getattr(module, "processor", None), "split_sequence")]
    if len(split) != len(transformer.blocks):
        raise ValueError(f"split_sequence expects every block's self-attention rearranged by pipeline.dit, found {len(split)} of {len(transformer.blocks)}")
    for processor in split:
        processor.split_sequence = True
