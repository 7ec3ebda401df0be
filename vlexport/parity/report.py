"""Parity report output: a rich table for people, JSON for tools, JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def _g(v, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _basis(c: dict) -> str:
    return "float64" if c.get("basis") == "oracle" else "FP32 ref"


def _limit(c: dict) -> str:
    """The bound the check applied, and where it came from when the oracle raised it above the profile's limit."""
    if c.get("limit") is None:
        return "-"
    fmt = ".8g" if c["op"] == ">=" else ".3g"
    text = f"{c['op']} {c['limit']:{fmt}}"
    if c.get("basis") == "oracle" and c.get("fixed_limit") is not None and c["limit"] != c["fixed_limit"]:
        text += f" ({c['oracle_k']:g}x FP32's)"
    return text


def _value(c: dict) -> str:
    return _g(c.get("value"), ".8g" if c.get("op") == ">=" else ".4g")


def render_table(report: dict, console) -> None:
    from rich.table import Table

    oracle = report.get("oracle") or {}
    used = oracle.get("mode") == "fp64"
    table = Table(title="vlexport parity vs PyTorch reference (adapters unmerged)"
                  + (" and its float64 oracle" if used else ""))
    columns = ["part", "output", "metric", "vs", "worst value", "limit"]
    if used:
        columns += ["FP32 vs float64", "ratio"]
    for col in columns + ["worst case", "result"]:
        table.add_column(col, overflow="fold")
    for c in report["checks"]:
        row = [c["part"], c["output"], c["metric"], _basis(c), _value(c), _limit(c)]
        if used:
            fp32 = c.get("fp32_value")
            row += [_g(fp32, ".8g" if c.get("op") == ">=" else ".3g"), _g(c.get("ratio"), ".3g")]
        row += [str(c["worst_case"] or "-"), "[green]pass[/]" if c["passed"] else "[red]FAIL[/]"]
        table.add_row(*row)
    console.print(table)
    for c in report["checks"]:
        if c.get("message"):
            console.print(f"[red]{c['part']}/{c['output']}: {c['message']}[/]", highlight=False)
    if used:
        ot = Table(title="error against the float64 oracle (worst over all cases; ratio < 1: the bundle is nearer "
                         "float64 than PyTorch FP32 is)")
        for col in ("part/output", "metric", "bundle", "PyTorch FP32", "ratio", "worst case"):
            ot.add_column(col)
        for o in oracle["outputs"]:
            ot.add_row(f"{o['part']}/{o['output']}", o["metric"], _g(o["bundle"]), _g(o["reference"]),
                       _g(o["ratio"], ".2f"), str(o["worst_case"]))
        console.print(ot)
        for t in oracle["near_ties"]:
            if t["accepted"]:
                what = "the bundle took float64's token: accepted, later tokens not compared"
            elif not t["compared"]:
                what = "after the bundle's first divergence: not compared"
            elif t["bundle_token"] == t["reference_token"]:
                what = "the bundle agrees with PyTorch FP32"
            else:
                what = "the bundle took a third token: fails"
            console.print(f"[yellow]near-tie[/] {t['case']} position {t['position']}: PyTorch FP32 token "
                          f"{t['reference_token']}, float64 {t['oracle_token']}, bundle {t['bundle_token']} ({what})",
                          highlight=False)
    console.print(f"[dim]oracle: {'float64' if used else 'off'} ({oracle.get('reason', 'not recorded')})"
                  + (f"; {oracle['note']}" if oracle.get("note") else "") + "[/]", highlight=False)
    detail = Table(title="worst over all cases, against the FP32 reference (informational)")
    for col in ("part/output", "metric", "value"):
        detail.add_column(col)
    for part, outputs in report["parts"].items():
        for output, values in outputs.items():
            for metric, v in values.items():
                detail.add_row(f"{part}/{output}", metric, _g(v, ".4g"))
    console.print(detail)
    style = "green" if report["passed"] else "red"
    console.print(f"[{style}]parity: {report['summary']}[/] ({len(report['cases'])} cases)")


def write_junit(report: dict, path: str | Path) -> None:
    """One testcase per check (classname <part>.<output>, name <metric>); oracle checks carry their numbers as
    properties, and a failure's message gives the value, the bound and the worst case."""
    from .verify import describe_check

    failures = sum(not c["passed"] for c in report["checks"])
    suite = ET.Element("testsuite", name="vlexport.parity", tests=str(len(report["checks"])), failures=str(failures))
    oracle = report.get("oracle") or {}
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="oracle", value=str(oracle.get("mode", "off")))
    ET.SubElement(props, "property", name="oracle_reason", value=str(oracle.get("reason", "")))
    for c in report["checks"]:
        case = ET.SubElement(suite, "testcase", classname=f"{c['part']}.{c['output']}", name=c["metric"])
        cp = ET.SubElement(case, "properties")
        for key in ("basis", "value", "limit", "fixed_limit", "oracle_k", "fp32_value", "ratio", "worst_case"):
            if c.get(key) is not None:
                ET.SubElement(cp, "property", name=key, value=str(c[key]))
        if not c["passed"]:
            fail = ET.SubElement(case, "failure", message=describe_check(c))
            fail.text = f"worst case: {c['worst_case']}"
    root = ET.Element("testsuites", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.ElementTree(root).write(str(path), encoding="utf-8", xml_declaration=True)
