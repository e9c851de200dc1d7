"""umT5 prompt encoding, as the official Wan2.1 does it, minus the 512-token padding work.

The official code pads every prompt to 512 tokens, runs the encoder with a mask and then trims the
output to the real tokens. Running the encoder over the real tokens alone gives the same values
(the mask hides the padding from every real position) at a fraction of the cost on a CPU. The DiT
still sees a zero-padded 512-token context: `pad_context` builds it right before the DiT.
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections import OrderedDict

import ftfy
import torch

MAX_TEXT_TOKENS = 512


def clean_text(text: str) -> str:
    """The official tokenizer wrapper's cleaning: ftfy, double HTML unescape, collapsed whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def pad_context(embeds: torch.Tensor) -> torch.Tensor:
    """[n, dim] real-token embeddings -> [512, dim], zero-padded (the DiT was trained on this)."""
    n_tokens, dim = embeds.shape
    return torch.cat([embeds, embeds.new_zeros(MAX_TEXT_TOKENS - n_tokens, dim)])


class PromptEncoder:
    """Tokenizer + umT5 encoder with an LRU cache keyed by cleaned text.

    `encode` returns one `[n_tokens, dim]` CPU tensor per text. The default negative prompt, and any
    prompt a user repeats, is encoded once per process.
    """

    def __init__(self, tokenizer, model, device: torch.device, cache_size: int = 256):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def cached(self, text: str) -> torch.Tensor | None:
        """The text's embeddings if they are cached, without running the encoder."""
        return self._lookup(clean_text(text))

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        cleaned = [clean_text(text) for text in texts]
        distinct = list(dict.fromkeys(cleaned))
        found = {text: embeds for text in distinct if (embeds := self._lookup(text)) is not None}
        missing = [text for text in distinct if text not in found]
        if missing:
            found.update(zip(missing, self._run_encoder(missing)))
        with self._lock:
            for text in missing:
                self._cache[text] = found[text]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.cache_misses += len(missing)
        return [found[text] for text in cleaned]

    def touch_weights(self) -> int:
        """Read every memory page of the encoder's CPU weights; returns the bytes they span.

        Checkpoints load memory-mapped, so without this the first prompts page ~11 GB of umT5-XXL in
        from the disk or the page cache while a user waits (seconds: issue 17's first encode).
        One element per 4 KiB page is enough to make the kernel map it.
        """
        spanned = 0
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.device.type != "cpu" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            flat[:: max(1, 4096 // flat.element_size())].float().sum()
            spanned += flat.numel() * flat.element_size()
        return spanned

    @torch.inference_mode()
    def probe_seconds(self, n_tokens: int = 40) -> float:
        """Seconds of one uncached encoder pass over `n_tokens` tokens: a new prompt's cost on this machine."""
        ids = (torch.arange(n_tokens) % 1000 + 3).unsqueeze(0).to(self.device)  # ordinary ids, past pad/eos/unk
        started = time.perf_counter()
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _lookup(self, cleaned: str) -> torch.Tensor | None:
        """A cached text's embeddings (counted as a hit and made the most recently used), or None."""
        with self._lock:
            embeds = self._cache.get(cleaned)
            if embeds is not None:
                self._cache.move_to_end(cleaned)
                self.cache_hits += 1
        return embeds

    @torch.inference_mode()
    def _run_encoder(self, texts: list[str]) -> list[torch.Tensor]:
        """One encoder pass over the batch, padded only to its longest member and masked."""
        tokens = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_TOKENS,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [row[:n].to("cpu").clone() for row, n in zip(hidden, lengths)]
