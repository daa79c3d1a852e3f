"""The README's configuration table, made from the settings' types, defaults and descriptions (kernel/config.py)."""

from __future__ import annotations

from kernel.config import Settings


def settings_table() -> str:
    """The README's configuration table, made from the fields' types, defaults and descriptions."""
    rows = ["| variable | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "LOG_FORMAT":
            default = "json"  # `text` on a terminal (the description says so)
        if name == "MLFLOW_TRACKING_URI":
            default = "sqlite:///<project>/.mlflow/mlflow.db"
        shown = (
            "unset"
            if default in (None, "", ())
            else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        )
        rows.append(f"| `{name}` | {shown} | {_allowed(name, field)} | {field.description} |")
    return "\n".join(rows)


def _allowed(name: str, field) -> str:
    """What a field takes, in words, from its type and bounds."""
    if field.annotation is bool:
        return "true/false, 1/0, yes/no, on/off"
    if "Literal" in str(field.annotation):
        return ", ".join(f"`{value}`" for value in field.annotation.__args__)
    if name == "LOG_LEVEL":
        return "`debug`, `info`, `warning`, `error`, `critical`"
    if "SecretStr" in str(field.annotation):
        return "text (secret: never logged)"
    if "tuple" in str(field.annotation):
        return "names"
    bounds = {
        kind: getattr(m, kind)
        for m in field.metadata
        for kind in ("ge", "gt", "le")
        if getattr(m, kind, None) is not None
    }
    kind = {int: "integer", float: "number"}.get(field.annotation, "text")
    if "ge" in bounds and "le" in bounds:
        return f"{kind} {bounds['ge']} to {bounds['le']}"
    return " ".join([kind, *(f"{'≥' if k == 'ge' else '>'} {v}" for k, v in bounds.items())])
