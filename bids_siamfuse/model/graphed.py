"""One training step that replays a captured CUDA graph on full batches.

Both training stages (the siamese region networks and the attention heads) run steps of many
short kernels that are launch-bound on a GPU; capturing the whole step (batch gather, forward,
loss, backward, Adam) once and replaying it removes the launch cost (docs/benchmarks.md). The
first ``WARMUP`` full batches run eagerly on a side stream (capture requires it), partial
batches always run eagerly; both paths run the same kernels on the same tensors, so a graphed
fit gives the same numbers as an eager one.
"""

from __future__ import annotations

import warnings

import torch


class GraphedStep:
    """Base of a step: subclasses set up their optimizer and define :meth:`_eager`."""

    WARMUP = 3
    #: what runs without graphs when capture fails (for the warning)
    WHAT = "training"

    def _setup_graph(self, device: torch.device, batch_size: int, graphs: bool) -> None:
        self.device, self.batch_size, self.graphs = device, batch_size, graphs
        self.graph = None
        self.warm = 0
        self.static_out = None
        if graphs:
            self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)

    def _eager(self, idx: torch.Tensor) -> torch.Tensor:
        """One real step on ``idx``; returns the loss(es) before the step (detached)."""
        raise NotImplementedError

    def _captured(self, idx: torch.Tensor) -> torch.Tensor:
        """What the graph records (default: the whole step); :meth:`_replayed` runs the rest
        eagerly after every replay."""
        return self._eager(idx)

    def _replayed(self) -> None:
        """The part of a step run eagerly after each replay (default: none)."""

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.graphs or idx.numel() != self.batch_size:
            return self._eager(idx)
        if self.graph is None and self.warm < self.WARMUP:
            self.warm += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._eager(idx)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self.graph is None:
            self.static_idx.copy_(idx)
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.static_out = self._captured(self.static_idx)
            except RuntimeError as exc:  # capture unsupported here: stay eager
                warnings.warn(
                    f"CUDA graph capture failed ({exc}); {self.WHAT} without graphs",
                    stacklevel=2,
                )
                self.graphs = False
                self.opt.zero_grad(set_to_none=True)
                return self._eager(idx)
            self.graph = graph
        self.static_idx.copy_(idx)
        self.graph.replay()
        self._replayed()
        return self.static_out.clone()
