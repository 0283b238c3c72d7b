#!/usr/bin/env bash
# Every GPU measurement in one call of a machine with a GPU and no network: this checkout installed
# offline, the correctness checks (benchmarks/gpu_checks.py: tokens against eager, host syncs,
# threads), then the speed suite (benchmarks/gpu_suite.py) in the time left. Run from the repository
# root:
#
#   OUT=/tmp/gpu TOTAL_S=450 bash benchmarks/gpu_device_run.sh
#
# Both scripts write into a work directory as they go (WORK, default /tmp/gpu_work; the suite's
# random guide checkpoints too); on exit, killed or not, five files are copied to $OUT: checks.md,
# checks.jsonl, suite.md, suite.jsonl and run.log (the install, the GPU, both scripts' output).
# SITE (default /tmp/dare_site) is where it installs; CHECKS_ARGS and SUITE_ARGS add arguments to
# the two scripts (a CPU smoke run of this file gives both `--device cpu --shape tiny ...`);
# LINK_INSTALL=1 skips pip and links (the fallback, tested on the CPU).
#
# The install: pip, offline and without build isolation (setuptools >= 77 builds it); where that
# fails, a site directory of links to the packages and a dist-info with pyproject.toml's entry points,
# which is all the built-in plugins need to be found (they register through entry points).
set -u
out=${OUT:?set OUT to the results directory}
total=${TOTAL_S:-450}
site=${SITE:-/tmp/dare_site}
work=${WORK:-/tmp/gpu_work}
python=${PYTHON:-python3}
started=$SECONDS
rm -rf "$work" && mkdir -p "$work" "$out"
log="$work/run.log"

collect() {
    cp -f "$work/checks/results.md" "$out/checks.md" 2>/dev/null
    cp -f "$work/checks/results.jsonl" "$out/checks.jsonl" 2>/dev/null
    cp -f "$work/suite/results.md" "$out/suite.md" 2>/dev/null
    cp -f "$work/suite/results.jsonl" "$out/suite.jsonl" 2>/dev/null
    cp -f "$log" "$out/run.log"
}
# each script runs in the background and is waited for, so that a TERM interrupts the wait at once:
# the running script is stopped too (it records its running row and writes its table), then collected
child=""
run() { "$@" & child=$!; wait "$child"; local status=$?; child=""; return $status; }
stop() {
    echo "killed after $(( SECONDS - started )) s" >> "$log"
    [[ -n $child ]] && kill -TERM "$child" 2>/dev/null && wait "$child"
    exit 143
}
trap collect EXIT
trap stop TERM INT

rm -rf "$site"
if [[ -n ${LINK_INSTALL:-} ]] || ! "$python" -m pip install -q --no-deps --no-build-isolation --no-index \
        --target "$site" . >> "$log" 2>&1; then
    echo "pip install failed or skipped; linking the packages with a dist-info instead" | tee -a "$log"
    rm -rf "$site" && mkdir -p "$site"
    ln -s "$PWD/dare_pipeline" "$site/dare_pipeline"
    ln -s "$PWD/plugins" "$site/dare_pipeline_plugins"
    "$python" - "$site" >> "$log" 2>&1 <<'PY' || { echo "the fallback install failed too" | tee -a "$log"; exit 3; }
import pathlib, sys, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
dist = pathlib.Path(sys.argv[1]) / f"dare_pipeline-{project['version']}.dist-info"
dist.mkdir()
(dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: dare-pipeline\nVersion: {project['version']}\n")
groups = {**project.get("entry-points", {}), "console_scripts": project.get("scripts", {})}
(dist / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in items.items()) + "\n"
    for group, items in groups.items()))
print("linked", sorted(p.name for p in pathlib.Path(sys.argv[1]).iterdir()))
PY
fi
export PYTHONPATH="$site:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "from dare_pipeline.core.registry import available_plugins; print('plugins:', sorted(available_plugins()))" \
    2>&1 | tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$log" 2>&1

left=$(( total - (SECONDS - started) ))
checks=$(( left < 400 ? left / 2 : 200 ))
echo "== gpu_checks ($checks s)" >> "$log"
run timeout -k 10 "$checks" "$python" benchmarks/gpu_checks.py --out "$work/checks" --budget-s $(( checks - 20 )) \
    ${CHECKS_ARGS:-} >> "$log" 2>&1
echo "gpu_checks: exit $? after $(( SECONDS - started )) s" | tee -a "$log"

left=$(( total - (SECONDS - started) ))
if (( left > 60 )); then
    echo "== gpu_suite ($left s)" >> "$log"
    run timeout -k 10 "$left" "$python" benchmarks/gpu_suite.py --out "$work/suite" --budget-s $(( left - 30 )) \
        ${SUITE_ARGS:-} >> "$log" 2>&1
    echo "gpu_suite: exit $? after $(( SECONDS - started )) s" | tee -a "$log"
fi
tail -n 40 "$work/checks/results.md" 2>/dev/null
tail -n 60 "$work/suite/results.md" 2>/dev/null
