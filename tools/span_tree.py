"""Draw requests' span trees from `cast up --trace console` output (the lines telemetry.span_line writes).

    .venv/bin/python -m tools.span_tree < up.log [--attributes gen_ai.usage.output_tokens,cast.step.accepted_tokens]

A request's trace is drawn as a tree (children indented under their parent); the spans of other traces that link to
one of its spans (its steps, its prefill and release batches) are drawn under a `~ linked` line, each with its own
tree (the draft and verify services' spans under the step's).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class Span:
    service: str
    name: str
    trace: str
    id: str
    parent: str
    duration: str
    status: str
    links: list[tuple[str, str]] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)


def parse(line: str) -> Span | None:
    words = line.split()
    if len(words) < 8 or words[0] != "span":
        return None
    fields = dict(w.split("=", 1) for w in words[3:] if "=" in w)
    links = [tuple(link.split("/")) for link in fields.pop("links", "").split(",") if link]
    span = Span(words[1], words[2], fields.pop("trace"), fields.pop("id"), fields.pop("parent"), words[6],
                fields.pop("status"), links)
    span.attributes = fields
    return span


def short(value: str) -> str:
    """A float to 4 significant digits; anything else as it is."""
    try:
        return f"{float(value):.4g}" if "." in value else value
    except ValueError:
        return value


def draw(spans: list[Span], shown: list[str]) -> str:
    children: dict[str, list[Span]] = defaultdict(list)
    linked: dict[str, list[Span]] = defaultdict(list)  # span id -> the roots of other traces that link to it
    for s in spans:
        children[s.parent].append(s)
        for _, span_id in s.links:
            linked[span_id].append(s)
    out: list[str] = []

    def line(s: Span, depth: int) -> None:
        extra = " ".join(f"{k}={short(s.attributes[k])}" for k in shown if k in s.attributes)
        status = "" if s.status == "UNSET" else f" [{s.status}]"
        out.append(f"{'  ' * depth}{s.name} ({s.service}) {s.duration}{status} {extra}".rstrip())
        for child in children[s.id]:  # in the order they ended
            line(child, depth + 1)

    requests = [s for s in spans if s.parent == "-" and not s.links]
    for root in requests:
        out.append(f"trace {root.trace}")
        line(root, 1)
        batches = [b for s in spans if s.trace == root.trace for b in linked[s.id]]
        if batches:
            out.append("  ~ linked (traces of their own)")
            for b in batches:
                line(b, 2)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attributes", default="", help="attributes to show, comma-separated")
    a = p.parse_args(argv)
    spans = [s for s in map(parse, sys.stdin) if s is not None]
    print(draw(spans, [k for k in a.attributes.split(",") if k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
