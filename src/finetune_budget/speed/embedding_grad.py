"""A word embedding's gradient kept in one buffer across steps, its touched rows re-zeroed.

A dense embedding's backward allocates a fresh (vocabulary, hidden) gradient and zero-fills it on
every step, though a batch touches a few hundred of its rows: for MiniLM 30522 x 384 floats, a
47 MB fill, 2.5-5% of a labelled-items training step on the 2-core CPU, and gradient clipping
then read and scaled all of it (docs/performance.md).
`keep_embedding_gradients(module)` makes each large, untied `nn.Embedding` of the module send its
gradient sparse (its rows and their values) and adds those rows into one dense buffer that is
`.grad` from then on; the next window's first backward re-zeroes only the rows the last one
touched. The optimiser and checkpoints still see a dense `.grad` (as before), and
`optimizer.zero_grad(set_to_none=True)` still works as before; gradient clipping
(`optim.clip_grad_norm`) reads and scales only the touched rows (`rows_by_weight`).

The values equal the dense backward's where each table is looked up once a step (labelled items:
bitwise); where it is looked up twice (pairs: queries and positives), a token on both sides has
its rows summed in another order, so those gradients differ by float rounding.

Used where a fit runs on one CPU device (`FineTuner.on_fit_start`: Lightning's single-device
strategy) and released when it ends. Not under DDP, whose reducer expects a sparse embedding to
leave its gradient sparse, and not on GPUs, whose memory fills 47 MB in microseconds.
"""

from __future__ import annotations

import torch
from torch import nn

# Tables smaller than this keep torch's dense gradient (position and token-type embeddings).
MIN_ROWS = 4096


class KeptEmbeddingGradient:
    """The dense gradient buffer of one embedding, filled from its sparse gradients."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding
        self.weight = embedding.weight
        self.buffer: torch.Tensor | None = None  # zeros outside `touched`
        self.touched: list[torch.Tensor] = []  # rows written since the buffer was last zeroed
        self.incoming: list[torch.Tensor] = []  # rows of the gradient being accumulated
        self._unique: torch.Tensor | None = None  # touched, unique and sorted
        embedding.sparse = True
        self.handles = [
            self.weight.register_hook(self._record_rows),
            self.weight.register_post_accumulate_grad_hook(self._into_buffer),
        ]

    def _record_rows(self, grad: torch.Tensor) -> None:
        if grad.layout == torch.sparse_coo:
            self.incoming.append(grad._indices()[0])

    def _into_buffer(self, weight: torch.Tensor) -> None:
        grad, rows = weight.grad, self.incoming
        self.incoming = []
        if grad is None:
            return
        if grad.layout == torch.strided:
            if grad is self.buffer:  # a later backward of the window, added in place
                self.touched.extend(rows)
                if sum(len(r) for r in self.touched) > len(self.buffer):  # zero_grad() kept it
                    self.touched = [torch.unique(torch.cat(self.touched))]
            else:  # someone else's dense gradient: start over from it
                self.buffer, self.touched = None, []
            self._unique = None
            return
        # The window's first backward: .grad was None, autograd stored the sparse gradient.
        if self.buffer is None:
            self.buffer = torch.zeros_like(weight)
        elif self.touched:  # the clip's unique rows where it asked for them, else the list's
            stale = self._unique if self._unique is not None else torch.cat(self.touched)
            self.buffer.index_fill_(0, stale, 0.0)
        self.buffer.index_add_(0, grad._indices()[0], grad._values())
        self.touched, self._unique = rows, None
        weight.grad = self.buffer

    def nonzero_rows(self) -> torch.Tensor | None:
        """The rows outside which `.grad` is zero (unique, sorted), or None where `.grad` is
        not the kept buffer."""
        if self.buffer is None or self.weight.grad is not self.buffer:
            return None
        if self._unique is None:
            rows = torch.cat(self.touched) if self.touched else self.buffer.new_empty(0).long()
            self._unique = torch.unique(rows)
        return self._unique

    def remove(self) -> None:
        """Back to torch's dense gradient; `.grad` stays as it is."""
        for handle in self.handles:
            handle.remove()
        self.embedding.sparse = False
        self.buffer, self.touched, self._unique = None, [], None


def rows_by_weight(kept: list[KeptEmbeddingGradient]) -> dict[int, torch.Tensor]:
    """{id(weight): the rows outside which its gradient is zero} for `optim.clip_grad_norm`."""
    rows = {id(k.weight): k.nonzero_rows() for k in kept}
    return {key: r for key, r in rows.items() if r is not None}


def _eligible(module: nn.Module) -> list[nn.Embedding]:
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        m
        for m in module.modules()
        if type(m) is nn.Embedding
        and m.num_embeddings >= MIN_ROWS
        and m.weight.requires_grad
        and not m.sparse
        and m.max_norm is None
        and not m.scale_grad_by_freq
        and m.weight.device.type == "cpu"
        and uses[id(m.weight)] == 1  # a table tied to an output layer gets dense gradients
    ]


def keep_embedding_gradients(module: nn.Module) -> list[KeptEmbeddingGradient]:
    """Kept gradient buffers for the module's large, trainable, untied CPU embeddings (none
    for models without them); `.remove()` each to undo."""
    return [KeptEmbeddingGradient(m) for m in _eligible(module)]
