"""The one way etf_hf draws: a matplotlib `Figure` on its own Agg canvas.

No pyplot: nothing global changes (the user's backend, pyplot's list of open figures), no display is
needed, and a figure is freed like any object. Used by `etf_hf.collapse.plot_collapse`, the run plots of
`etf-hf train` and `etf-hf report`, and the examples.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A blank ``width`` x ``height`` inch figure with an Agg canvas (``figure.savefig`` writes PNGs).

    matplotlib is imported here, not with the module: `etf-hf report` reads its run folders first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Lay ``figure`` out tightly and write it to ``path`` (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    return path
