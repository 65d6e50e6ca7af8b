"""The benchmark's summary: a markdown table set, the targets checked, and a PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

BARE = "bare grpc.aio"
FASTAPI = "FastAPI (uvicorn, HTTP/1.1)"
ICEGATE = "icegate SQLite"
ICEGATE_REDIS = "icegate Redis"
# --workers runs on Redis only: one process owns a SQLite file (store/sqlite.py).
WORKERS_REDIS = "icegate Redis --workers 2"
ICEGATE_CONNECT = "icegate SQLite Connect"
"""The same icegate process loaded over Connect (binary protobuf, HTTP/1.1)."""


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _row(rows: list[dict[str, Any]], target: str, method: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["target"] == target and r["method"] == method), None)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not b["capacity_rps"]:
        return None
    return float(a["capacity_rps"]) / float(b["capacity_rps"])


def targets_table(results: dict[str, Any]) -> list[str]:
    compare = results.get("compare", [])
    sessions = results.get("sessions", {})
    scaling = results.get("scaling", [])
    issue = "IssueTurnCredentials"
    lines = ["| target | measured | met? |", "|---|---|---|"]

    def add(name: str, measured: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {measured} | {verdict} |")

    paired = results.get("paired", {}).get("ratios", {})
    if ICEGATE in paired:
        add("IssueTurnCredentials ≥ 0.85 x bare grpc.aio req/s (paired rounds: the headline)",
            f"{_fmt(paired[ICEGATE]['x_bare'])} x", paired[ICEGATE]["x_bare"] >= 0.85)
        add("IssueTurnCredentials ahead of FastAPI (paired rounds)",
            f"{_fmt(paired[ICEGATE]['x_fastapi'])} x", paired[ICEGATE]["x_fastapi"] > 1)
        if "x_one_worker" in paired.get(WORKERS_REDIS, {}):
            add(f"--workers 2 ≥ 1.3 x one worker ({WORKERS_REDIS}, paired rounds)",
                f"{_fmt(paired[WORKERS_REDIS]['x_one_worker'])} x",
                paired[WORKERS_REDIS]["x_one_worker"] >= 1.3)
    if ICEGATE_CONNECT in paired:
        connect = paired[ICEGATE_CONNECT]
        add("Connect, every feature on, ≥ 1.3 x FastAPI (paired rounds)",
            f"{_fmt(connect['x_fastapi'])} x", connect["x_fastapi"] >= 1.3)
        add("Connect ≥ 1.5 x icegate over gRPC (paired rounds)",
            f"{_fmt(connect.get('x_grpc'))} x", connect.get("x_grpc", 0) >= 1.5)
    counted_connect = results.get("instructions", {})
    if "connect_vs_fastapi" in counted_connect:
        add("Connect ≥ 1.3 x FastAPI in instructions per call (callgrind)",
            f"{_fmt(counted_connect['connect_vs_fastapi'])} x",
            counted_connect["connect_vs_fastapi"] >= 1.3)
    if "connect_vs_grpc" in counted_connect:
        add("Connect ≥ 1.5 x icegate over gRPC in instructions per call (callgrind)",
            f"{_fmt(counted_connect['connect_vs_grpc'])} x",
            counted_connect["connect_vs_grpc"] >= 1.5)
    connect_row = _row(compare, ICEGATE_CONNECT, issue)
    add("Connect p99 < 5 ms at 1,000 req/s, IssueTurnCredentials",
        f"{_fmt(connect_row['p99_ms'])} ms" if connect_row else "not measured",
        None if connect_row is None else connect_row["p99_ms"] < 5)
    icegate = _row(compare, ICEGATE, issue)
    vs_bare = _ratio(icegate, _row(compare, BARE, issue))
    add("IssueTurnCredentials ≥ 0.85 x bare grpc.aio req/s (sections one after another)",
        f"{_fmt(vs_bare)} x" if vs_bare else "not measured",
        None if vs_bare is None else vs_bare >= 0.85)
    bare = _row(compare, BARE, issue)
    if icegate and bare:
        efficiency = bare["cpu_us_per_call"] / icegate["cpu_us_per_call"]
        add("the same in CPU per call (bare µs / icegate µs; robust to other load)",
            f"{_fmt(efficiency)} x ({_fmt(bare['cpu_us_per_call'], 0)} vs "
            f"{_fmt(icegate['cpu_us_per_call'], 0)} µs)", efficiency >= 0.85)
    counted = results.get("instructions", {})
    if "icegate_vs_bare" in counted:
        per_call = counted["instructions_per_call"]
        add("the same in instructions per call (callgrind)",
            f"{_fmt(counted['icegate_vs_bare'])} x ({_fmt(per_call[BARE] / 1000, 0)}k vs "
            f"{_fmt(per_call[ICEGATE] / 1000, 0)}k)", counted["icegate_vs_bare"] >= 0.85)
        add("ahead of FastAPI in instructions per call",
            f"{_fmt(counted['icegate_vs_fastapi'])} x ({_fmt(per_call[FASTAPI] / 1000, 0)}k "
            f"vs {_fmt(per_call[ICEGATE] / 1000, 0)}k)", counted["icegate_vs_fastapi"] > 1)
    vs_fastapi = _ratio(icegate, _row(compare, FASTAPI, issue))
    add("IssueTurnCredentials ahead of FastAPI",
        f"{_fmt(vs_fastapi)} x" if vs_fastapi else "not measured",
        None if vs_fastapi is None else vs_fastapi > 1)
    workers = _ratio(_row(compare, WORKERS_REDIS, issue), _row(compare, ICEGATE_REDIS, issue))
    add(f"--workers 2 ≥ 1.3 x one worker ({WORKERS_REDIS})",
        f"{_fmt(workers)} x" if workers else "not measured",
        None if workers is None else workers >= 1.3)
    for target in (ICEGATE, ICEGATE_REDIS):
        row = _row(compare, target, issue)
        add(f"p99 < 10 ms at 1,000 req/s, IssueTurnCredentials, {target}",
            f"{_fmt(row['p99_ms'])} ms" if row else "not measured",
            None if row is None else row["p99_ms"] < 10)
    for row in sessions.get("rows", []):
        add(f"CreateSession adds ≤ 2 ms at p50 over direct httpx ({row['target']}, "
            "typed asyncio client)", f"{_fmt(row['added_p50_ms'])} ms", row["added_p50_ms"] <= 2)
    for flat in results.get("flatness", []):
        add(f"per-call cost flat across {flat['projects']:,} projects ({flat['store']}, "
            "paired rounds)",
            f"req/s {_fmt(flat['rps_ratio'])} x, CPU per call {_fmt(flat['cpu_ratio'])} x "
            "the 1-project figures", flat["rps_ratio"] >= 0.9 and flat["cpu_ratio"] <= 1.1)
    for store in ("sqlite", "redis"):
        points = [r for r in scaling if r["store"] == store]
        base = next((r for r in points if r["leases"] == 0 and r["projects"] == 100), None)
        most = max((r for r in points if r["leases"]), key=lambda r: r["leases"], default=None)
        if base and most:
            cost = (most["server_peak_rss_mib"] - base["server_peak_rss_mib"]
                    + most["store_mib"] - base["store_mib"])
            extra = (f" (RSS {_fmt(most['store_rss_mib'] - base['store_rss_mib'], 1)} MiB)"
                     if store == "redis" else "")
            shown = (f"{_fmt(cost, 1)} MiB" if cost >= 1
                     else "under 1 MiB (within the run-to-run spread of peak RSS)")
            add(f"{most['leases']:,} active leases cost < 100 MB ({store})",
                f"{shown}: server peak RSS + store size{extra}", cost < 100)
        one = next((r for r in points if r["projects"] == 1 and r["leases"] == 0), None)
        many = max((r for r in points if r["leases"] == 0), key=lambda r: r["projects"],
                   default=None)
        if one and many and many is not one:
            ratio = many["capacity_rps"] / one["capacity_rps"]
            cpu = many["cpu_us_per_call"] / one["cpu_us_per_call"]
            add(f"per-call cost flat across {many['projects']:,} projects ({store}, "
                "scaling rows one after another)",
                f"req/s {_fmt(ratio)} x, CPU per call {_fmt(cpu)} x the 1-project figures",
                ratio >= 0.9 and cpu <= 1.1)
    return lines


def compare_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | method | req/s (closed loop) | x bare | x FastAPI | "
             "p50 ms | p99 ms | p99.9 ms | at req/s | errors | peak RSS MiB | server cores | "
             "server CPU µs/call | other work cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        bare = _ratio(row, _row(rows, BARE, row["method"]))
        fastapi = _ratio(row, _row(rows, FASTAPI, row["method"]))
        lines.append(
            f"| {row['target']} | {row['method']} | {_fmt(row['capacity_rps'], 0)} | "
            f"{_fmt(bare)} | {_fmt(fastapi)} | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | "
            f"{_fmt(row['p999_ms'])} | {_fmt(row['fixed_rate_rps'], 0)} | {row['errors']} | "
            f"{_fmt(row['peak_rss_mib'], 0)} | {_fmt(row['server_cores'])} | "
            f"{_fmt(row['cpu_us_per_call'], 0)} | {_fmt(row['foreign_cores'])} |")
    return lines


def sessions_table(sessions: dict[str, Any]) -> list[str]:
    if not sessions:
        return ["(not run)"]
    direct = sessions["direct_httpx"]
    lines = [f"Fake OpenAI `client_secrets` answering after {sessions['upstream_latency_ms']:g} "
             f"ms; latency at {sessions['rate_rps']} calls/s.", "",
             "The typed asyncio client is paced and timed in Python exactly as the direct httpx "
             "calls: its p50 minus theirs is what icegate adds. The h2load columns carry "
             "h2load's own gRPC pacing on top (a few ms even for a call that does nothing; "
             "compare the bare server's p50 above).", "",
             "| caller | req/s (closed loop, h2load) | p50 ms | p99 ms | p99.9 ms | "
             "h2load p50 / p99 ms | added p50 ms | errors | peak RSS MiB | server cores | "
             "server CPU µs/call | other work cores |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
             f"| direct httpx to the fake | - | {_fmt(direct['p50_ms'])} | "
             f"{_fmt(direct['p99_ms'])} | {_fmt(direct['p999_ms'])} | - | - | "
             f"{direct['errors']} | - | - | - | - |"]
    floor = sessions.get("grpc_round_trip")
    if floor:
        lines.append(
            f"| for scale: one gRPC round trip (bare server, plain grpc.aio stub, same pace) | "
            f"- | {_fmt(floor['p50_ms'])} | {_fmt(floor['p99_ms'])} | "
            f"{_fmt(floor['p999_ms'])} | - | - | {floor['errors']} | - | - | - | - |")
    for row in sessions["rows"]:
        client = row.get("client", {})
        lines.append(
            f"| {row['target']} CreateSession, typed asyncio client | "
            f"{_fmt(row['capacity_rps'], 0)} | {_fmt(client.get('p50_ms'))} | "
            f"{_fmt(client.get('p99_ms'))} | {_fmt(client.get('p999_ms'))} | "
            f"{_fmt(row['p50_ms'])} / {_fmt(row['p99_ms'])} | "
            f"{_fmt(row['added_p50_ms'])} | {row['errors'] + client.get('errors', 0)} | "
            f"{_fmt(row['peak_rss_mib'], 0)} | "
            f"{_fmt(row['server_cores'])} | {_fmt(row['cpu_us_per_call'], 0)} | "
            f"{_fmt(row['foreign_cores'])} |")
    return lines


def in_grid_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scaling rows by store, then leases, then projects (they run point by point)."""
    return sorted(rows, key=lambda r: (r["store"] != "sqlite", r["leases"], r["projects"]))


def scaling_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| store | projects | active leases | req/s | server cores | server CPU µs/call | "
             "other work cores | errors | server RSS idle MiB | server RSS peak MiB | store MiB | "
             "store RSS MiB | seeding s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in in_grid_order(rows):
        lines.append(
            f"| {row['store']} | {row['projects']:,} | {row['leases']:,} | "
            f"{_fmt(row['capacity_rps'], 0)} | {_fmt(row['server_cores'])} | "
            f"{_fmt(row['cpu_us_per_call'], 0)} | {_fmt(row['foreign_cores'])} | {row['errors']} | "
            f"{_fmt(row['server_idle_rss_mib'], 0)} | {_fmt(row['server_peak_rss_mib'], 0)} | "
            f"{_fmt(row['store_mib'], 1)} | "
            f"{_fmt(row['store_rss_mib'], 1) if row['store'] == 'redis' else '-'} | "
            f"{_fmt(row['seed_seconds'], 1)} |")
    return lines


def summary(results: dict[str, Any]) -> str:
    m = results["machine"]
    plan = results["plan"]
    lines = [
        f"# icegate benchmark: {results['mode']} run of {results['started']}", "",
        f"`{results['command']}` on {m['nproc']} x {m['cpu_model']}, {m['memory_gib']} GiB, "
        f"Python {m['python']}, grpcio {m['grpcio']}, {m['h2load']}, kernel {m['kernel']}; "
        f"{results['elapsed_seconds']:.0f} s in all. Load average before/after: "
        f"{' '.join(m['loadavg_at_start'])} / {' '.join(m.get('loadavg_at_end', []))} "
        "(the CPU other work on the machine took during a run is in the 'other work' columns).", "",
        f"Closed loop: h2load -c {plan['clients']} -m {plan['streams']} for "
        f"{plan['capacity_seconds']:g} s; latency: {plan['fixed_rate']:,} req/s "
        f"({plan['rate_clients']} clients, started 1/rate s apart so that calls arrive evenly "
        f"spaced, not in bursts) for {plan['latency_seconds']:g} s, percentiles "
        f"from h2load's per-request log; median of {plan['repeats']} run(s). "
        "Errors: calls without a full successful answer.", "",
        "## Targets", "", *targets_table(results), "",
        "## Paired rounds (IssueTurnCredentials capacity, every target in turn)", "",
        *paired_table(results.get("paired", {})), "",
        "## IssueTurnCredentials and GetIceServers", "", *compare_table(results["compare"]),
        "", "## CreateSession", "", *sessions_table(results.get("sessions", {})), "",
        "## Scaling (IssueTurnCredentials, closed loop)", "",
        *scaling_table(results.get("scaling", [])), "",
        "## Instructions per call (callgrind)", "", *instructions_table(results), "",
    ]
    if results.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in results["notes"]), ""]
    return "\n".join(lines)


def paired_table(paired: dict[str, Any]) -> list[str]:
    if not paired:
        return ["(not run)"]
    lines = [f"{paired['rounds']} rounds; in each, every target's closed loop (h2load -c 32 -m 8, "
             f"{paired['seconds']} s) runs within seconds of the others'. Ratios are medians of "
             "the per-round ratios.", "",
             "| target | req/s (median) | x bare | x FastAPI | x one worker | x over gRPC | runs |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for target, figures in paired["ratios"].items():
        runs = ", ".join(f"{r:,.0f}" for r in paired["runs"][target])
        lines.append(f"| {target} | {_fmt(figures['capacity_rps'], 0)} | "
                     f"{_fmt(figures['x_bare'])} | {_fmt(figures['x_fastapi'])} | "
                     f"{_fmt(figures.get('x_one_worker'))} | {_fmt(figures.get('x_grpc'))} | "
                     f"{runs} |")
    return lines


def instructions_table(results: dict[str, Any]) -> list[str]:
    counted = results.get("instructions")
    if not counted:
        return ["(not run)"]
    if "instructions_per_call" not in counted:
        return [counted.get("note", "(not measured)")]
    lines = [f"IssueTurnCredentials (FastAPI: its JSON twin), {counted['calls'][1]} calls minus "
             f"{counted['calls'][0]}, h2load -c 8 -m 4; every thread of the server process "
             "counted. On a quiet machine the same from run to run within a few percent.", "",
             "| target | instructions per call | x bare |", "|---|---:|---:|"]
    bare = counted["instructions_per_call"][BARE]
    for target, count in counted["instructions_per_call"].items():
        lines.append(f"| {target} | {_fmt(count, 0)} | {_fmt(bare / count)} |")
    return lines


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compare = results["compare"]
    names = list(dict.fromkeys(r["target"] for r in compare))
    methods = list(dict.fromkeys(r["method"] for r in compare))
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        values = [(_row(compare, n, method) or {"capacity_rps": 0})["capacity_rps"]
                  for n in names]
        axes[0].bar([x + i * width for x in range(len(names))], values, width, label=method)
        p99 = [(_row(compare, n, method) or {"p99_ms": 0})["p99_ms"] for n in names]
        axes[1].bar([x + i * width for x in range(len(names))], p99, width, label=method)
    for ax, title in ((axes[0], "capacity, req/s (closed loop, -c32 -m8)"),
                      (axes[1], f"p99 ms at {results['plan']['fixed_rate']:,} req/s")):
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels([n.replace(" (", "\n(").replace(" --", "\n--") for n in names],
                           fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(10, color="red", linestyle="--", linewidth=1)

    scaling = in_grid_order(results.get("scaling", []))
    labels = [f"{r['store']}\n{r['projects']:,}p\n{r['leases']:,}l" for r in scaling]
    axes[2].bar(range(len(scaling)), [r["capacity_rps"] for r in scaling], color="tab:green")
    axes[2].set_xticks(range(len(scaling)))
    axes[2].set_xticklabels(labels, fontsize=7)
    axes[2].set_title("IssueTurnCredentials req/s vs projects (p) and leases (l)")
    twin = axes[2].twinx()
    twin.plot(range(len(scaling)), [r["server_peak_rss_mib"] + r["store_mib"] for r in scaling],
              "o-", color="tab:purple")
    twin.set_ylabel("server peak RSS + store, MiB", color="tab:purple")
    twin.set_ylim(bottom=0)
    axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(f"icegate benchmark ({results['mode']}), {results['machine']['nproc']} CPUs, "
                 f"{results['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], directory: Path) -> str:
    text = summary(results)
    (directory / "summary.md").write_text(text)
    chart(results, directory / "bench.png")
    return text
