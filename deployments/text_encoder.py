"""TextEncoder deployment: tokenizer + umT5 encoder only, on the CPU or on a GPU.

`t5_cpu` is a placement decision: the same class is deployed as TextEncoderCPU (num_gpus 0) and,
optionally, TextEncoderGPU. The device comes from that placement, never from
`torch.cuda.is_available()`, since Ray leaves GPUs visible to replicas that asked for none.
Concurrent encodes are batched, and the prompt cache makes repeats (the default negative prompt
above all) free.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from deployments.messages import EncodedText, TextEncoderOptions
from deployments.metrics import TextEncoderMetrics
from pipeline.loading import ModelSource, load_text_encoder, parse_dtype, default_text_dtype
from pipeline.startup import StartupPhases
from pipeline.text import PromptEncoder

log = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=64)
class TextEncoder:
    def __init__(self, source: ModelSource, placement: str, options: TextEncoderOptions, warm_texts: tuple[str, ...] = ()):
        """`warm_texts`: encoded (and so cached) before the replica reports ready: the default negative
        prompt, which nearly every job needs first. The first job then waits for nothing that a later
        one would not: the weights are in memory, the kernels chosen, the negative prompt cached."""
        self.startup = StartupPhases()
        self.placement = placement
        self.device = torch.device("cpu")
        if placement == "gpu":
            if torch.cuda.is_available():
                self.device = torch.device("cuda")
            else:
                log.warning("TextEncoderGPU found no CUDA device; encoding on the CPU")
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        dtype = default_text_dtype(source) if options.dtype == "auto" else parse_dtype(options.dtype)
        with self.startup.phase("load"):
            tokenizer, model = load_text_encoder(source, self.device, dtype)
        self.encoder = PromptEncoder(tokenizer, model, self.device, cache_size=options.cache_size)
        with self.startup.phase("touch_weights"):
            self.encoder.touch_weights()
        with self.startup.phase("encode_warm_texts"):
            self.encoder.encode(list(warm_texts))
        # What a new 40-token prompt costs with this replica's threads: the number to size them by.
        self.startup.record("probe_40_tokens", self.encoder.probe_seconds(40))
        self._encode_batch.set_max_batch_size(options.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.metrics = TextEncoderMetrics()
        log.info("TextEncoder(%s) on %s in %s, %d threads, %s", placement, self.device, dtype, torch.get_num_threads(), self.startup.done())

    async def encode(self, text: str) -> EncodedText:
        """Real-token embeddings [n_tokens, dim] of one prompt or negative prompt, with the encode time.

        A cached text is answered at once rather than in the next batch: the generator starts a job
        as soon as its negative prompt is here, while the prompt may still be encoding.
        """
        started = time.perf_counter()
        embeddings = self.encoder.cached(text)
        if embeddings is None:
            embeddings = await self._encode_batch(text)
        seconds = time.perf_counter() - started
        self.metrics.encoded(seconds, self.encoder.cache_hits, self.encoder.cache_misses)
        log.info("encoded %d tokens in %.3fs", embeddings.shape[0], seconds)
        return EncodedText(embeddings=embeddings, seconds=seconds)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, texts: list[str]) -> list[torch.Tensor]:
        return await asyncio.to_thread(self.encoder.encode, texts)

    def describe(self) -> dict:
        """Where this replica runs and what its cache did; also the readiness probe."""
        return {
            "placement": self.placement,
            "device": str(self.device),
            "dtype": str(self.encoder.dtype).removeprefix("torch."),
            "cuda_initialized": torch.cuda.is_initialized(),
            "torch_threads": torch.get_num_threads(),
            "cache_hits": self.encoder.cache_hits,
            "cache_misses": self.encoder.cache_misses,
            "startup": self.startup.report(),
        }
