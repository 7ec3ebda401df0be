"""Parity report output: a rich table for people, JSON for tools, JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def render_table(report: dict, console) -> None:
    from rich.table import Table

    table = Table(title="vlexport parity vs PyTorch reference (adapters unmerged)")
    for col in ("part", "output", "metric", "worst value", "limit", "worst case", "result"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(
            c["part"], c["output"], c["metric"], f"{c['value']:.4g}", f"{c['op']} {c['limit']:g}",
            str(c["worst_case"] or "-"), "[green]pass[/]" if c["passed"] else "[red]FAIL[/]",
        )
    console.print(table)
    detail = Table(title="worst over all cases (informational)")
    for col in ("part/output", "metric", "value"):
        detail.add_column(col)
    for part, outputs in report["parts"].items():
        for output, values in outputs.items():
            for metric, v in values.items():
                detail.add_row(f"{part}/{output}", metric, "-" if v is None else f"{v:.4g}")
    console.print(detail)
    style = "green" if report["passed"] else "red"
    console.print(f"[{style}]parity: {report['summary']}[/] ({len(report['cases'])} cases)")


def write_junit(report: dict, path: str | Path) -> None:
    failures = sum(not c["passed"] for c in report["checks"])
    suite = ET.Element("testsuite", name="vlexport.parity", tests=str(len(report["checks"])), failures=str(failures))
    for c in report["checks"]:
        case = ET.SubElement(suite, "testcase", classname=f"{c['part']}.{c['output']}", name=c["metric"])
        if not c["passed"]:
            fail = ET.SubElement(case, "failure", message=f"{c['metric']}={c['value']:.6g} not {c['op']} {c['limit']:g}")
            fail.text = f"worst case: {c['worst_case']}"
    root = ET.Element("testsuites", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.ElementTree(root).write(str(path), encoding="utf-8", xml_declaration=True)
