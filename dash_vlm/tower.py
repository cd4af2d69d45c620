"""The vision tower on the fast path (DESIGN.md section 8): what the tower derives from its grid alone, computed once
per grid from the grid on the host.

A Qwen tower rebuilds its rotary tables, segment boundaries and (Qwen2.5-VL) window order from ``grid_thw`` on every
call, reading the grid back from the device item by item: about a hundred host synchronisations a pass
(BENCHMARKS.md "Host synchronisations of the tower"). Those depend on the grid only. On the fast path the grids of a
prefill's inputs are read on the host once, before the model runs, and while it runs the tower's ``forward`` is
:meth:`ModelAdapter.vision_forward` on :meth:`ModelAdapter.vision_tables` of its grid, kept for the last few grids.
The tower is still called as a module, its grid swapped for the same grid on the host by a pre-hook that runs first, so
the press's vision-halting hooks run as on the eager path and read the grid without a host synchronisation. Tables
cost device memory: about 3 KB per patch for Qwen3-VL (rotary ``cos`` and ``sin`` in float32, learned positions), some
0.3 GB for a 100,000-patch video; ``size`` bounds how many grids keep theirs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dash_vlm.models import adapter_for

logger = logging.getLogger(__name__)

Grid = tuple[tuple[int, ...], ...]


class TowerTables:
    """The tables of a model's vision tower per grid (``size`` grids kept, least recently used dropped), and the
    tower's forward on them while :meth:`installed`.

    ``grid_reads`` counts the tower calls whose grid was not among the inputs given to :meth:`installed` (then read
    back from the device, where it lies there)."""

    def __init__(self, model: nn.Module, size: int = 8):
        self.adapter = adapter_for(model)
        self.tower = self.adapter.vision_tower(model)
        self.size = size
        self.tables: OrderedDict[Grid, dict] = OrderedDict()
        self.grid_reads = 0
        self._host_grids: dict[int, Grid] = {}

    @property
    def applies(self) -> bool:
        """Whether the family has tables and nothing else replaced the tower's forward (accelerate's hooks do)."""
        return bool(self.adapter.vision_grid_keys) and self.tower is not None and "forward" not in vars(self.tower)

    @contextmanager
    def installed(self, inputs: dict) -> Iterator[None]:
        """Within the block the tower runs on its tables; the grids of ``inputs`` are read on the host here, once."""
        if not self.applies:
            yield
            return
        self._host_grids = {
            id(inputs[key]): grid_rows(inputs[key])
            for key in self.adapter.vision_grid_keys
            if inputs.get(key) is not None
        }
        self.tower.forward = self._forward
        handle = self.tower.register_forward_pre_hook(self._grid_on_host, with_kwargs=True, prepend=True)
        try:
            yield
        finally:
            handle.remove()
            del self.tower.forward
            self._host_grids = {}

    def for_grid(self, grid: Grid) -> dict:
        """The tables of ``grid``, made the first time it comes."""
        tables = self.tables.get(grid)
        if tables is None:
            # ordinary tensors, not inference tensors, even inside the fast path's inference mode: a tower called
            # outside inference mode (with autograd off) can read them too
            with torch.inference_mode(False), torch.no_grad():
                tables = self.adapter.vision_tables(self.tower, grid)
            while len(self.tables) >= self.size:
                self.tables.popitem(last=False)
        self.tables[grid] = tables
        self.tables.move_to_end(grid)
        return tables

    def _grid_on_host(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The tower's grid argument swapped for the same grid on the host, for every later hook and the forward."""
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        rows = self._host_grids.get(id(grid))
        if rows is None:
            self.grid_reads += 1
            logger.debug("the vision tower was called with a grid not among the prefill's inputs; reading it")
        host = torch.tensor(grid_rows(grid) if rows is None else rows, dtype=grid.dtype)
        if "grid_thw" in kwargs:
            return args, {**kwargs, "grid_thw": host}
        return (args[0], host, *args[2:]), kwargs

    def _forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        if any(key != "return_dict" or value is not True for key, value in kwargs.items()):
            # what only transformers' own forward gives (hidden states of every block, tuples): run it, on the host grid
            return type(self.tower).forward(self.tower, hidden_states, grid_thw, **kwargs)
        return self.adapter.vision_forward(self.tower, hidden_states, self.for_grid(grid_rows(grid_thw)))


def grid_rows(grid: torch.Tensor) -> Grid:
    """A ``[items, 3]`` grid as a tuple of rows (a host read when it is on a GPU)."""
    return tuple(map(tuple, grid.tolist()))
