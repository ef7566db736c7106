"""Result files: a markdown table for the terminal and results/, JSON (and CSV) beside it, figures.

Committed tables are written only by their command as documented: a run with config overrides
that change what is measured writes `<name>-<hash of the overrides>` instead (`output_path`).
"""

import csv
import hashlib
import json
import os
import platform
import sys

import jax
import numpy as np

# Overrides that say where inputs live, not what is measured: they keep the committed name.
LOCATION_FIELDS = frozenset({"data_dir"})


def output_path(results_dir: str, name: str, overrides: dict) -> str:
  """`<results_dir>/<name>`, or `<results_dir>/<name>-<8 hex>` when `overrides` change the run."""
  measured = {key: value for key, value in overrides.items() if key not in LOCATION_FIELDS}
  if measured:
    text = json.dumps(measured, sort_keys=True, default=str)
    name = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
  return os.path.join(results_dir, name)


def mean_and_error(values) -> tuple[float, float]:
  """Mean and standard error over prompts (nan error for a single prompt): a table cell's value
  and the spread a reader weighs it by."""
  values = np.asarray(values, np.float64)
  error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
  return float(values.mean()), float(error)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
  columns = columns or list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def machine_description() -> str:
  device = jax.devices()[0]
  return (f"{device.platform} ({device.device_kind}), {os.cpu_count()} host cores, "
          f"{platform.machine()}, jax {jax.__version__}")


def write(path_without_extension: str, title: str, rows: list[dict], notes: str = "",
          columns: list[str] | None = None, with_csv: bool = False,
          details: dict | None = None) -> str:
  """Writes `<path>.md` (title, command, machine, table, notes), `<path>.json` (and `.csv`);
  `details`: more of what was measured, for the json alone (e.g. the rows behind each cell).

  Returns the markdown table.
  """
  table = markdown_table(rows, columns)
  os.makedirs(os.path.dirname(path_without_extension) or ".", exist_ok=True)
  command = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
  with open(path_without_extension + ".md", "w") as f:
    f.write(f"# {title}\n\nCommand: `python {command}`\n\nMachine: {machine_description()}\n\n"
            f"{table}\n\n{notes}".rstrip() + "\n")
  with open(path_without_extension + ".json", "w") as f:
    json.dump({"command": command, "machine": machine_description(), "rows": rows,
               **(details or {})}, f, indent=1)
  if with_csv:
    with open(path_without_extension + ".csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return table


def plot_lines(path: str, panels: dict, xlabel: str, ylabel: str) -> None:
  """One panel per key of `panels` = {title: {label: [(x label, y), ...]}}, x categorical."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (title, series) in zip(axes[0], panels.items()):
    ticks = list(dict.fromkeys(str(x) for points in series.values() for x, _ in points))
    for label, points in series.items():
      ax.plot([ticks.index(str(x)) for x, _ in points], [y for _, y in points], marker="o",
              label=label)
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
