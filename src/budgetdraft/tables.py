"""Result tables: markdown for the terminal and results/, JSON beside them for plots and diffs."""

import json
import os
import platform
import sys


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
  columns = columns or list(rows[0])
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def machine_description() -> str:
  import jax
  device = jax.devices()[0]
  return (f"{device.platform} ({device.device_kind}), {os.cpu_count()} host cores, "
          f"{platform.machine()}, jax {jax.__version__}")


def write_results(path_without_extension: str, title: str, table: str, data, notes: str = ""):
  """Writes `<path>.md` (title, command, machine, table, notes) and `<path>.json`."""
  os.makedirs(os.path.dirname(path_without_extension) or ".", exist_ok=True)
  command = " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
  with open(path_without_extension + ".md", "w") as f:
    f.write(f"# {title}\n\nCommand: `python {command}`\n\nMachine: {machine_description()}\n\n"
            f"{table}\n\n{notes}".rstrip() + "\n")
  with open(path_without_extension + ".json", "w") as f:
    json.dump({"command": command, "machine": machine_description(), "rows": data}, f, indent=1)
