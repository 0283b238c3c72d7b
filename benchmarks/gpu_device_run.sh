#!/usr/bin/env bash
# Every GPU measurement in one call of a machine with a GPU and no network: this checkout installed
# offline, the correctness checks (benchmarks/gpu_checks.py: tokens against eager, host syncs,
# threads; ~2 minutes), then the speed suite (benchmarks/gpu_suite.py) in the time left. Results go
# under $OUT (gpu_checks/, gpu_suite/, install.log); both scripts write as they go, so a cut-off run
# keeps what it measured. Run from the repository root:
#
#   OUT=/tmp/gpu TOTAL_S=450 bash benchmarks/gpu_device_run.sh
#
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
mkdir -p "$out"
started=$SECONDS
python=${PYTHON:-python3}

rm -rf "$site"
if [[ -n ${LINK_INSTALL:-} ]] || ! "$python" -m pip install -q --no-deps --no-build-isolation --no-index \
        --target "$site" . > "$out/install.log" 2>&1; then
    echo "pip install failed (install.log); linking the packages with a dist-info instead" | tee -a "$out/install.log"
    rm -rf "$site" && mkdir -p "$site"
    ln -s "$PWD/dare_pipeline" "$site/dare_pipeline"
    ln -s "$PWD/plugins" "$site/dare_pipeline_plugins"
    "$python" - "$site" >> "$out/install.log" 2>&1 <<'PY' || { echo "the fallback install failed too"; exit 3; }
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
    | tee -a "$out/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1

left=$(( total - (SECONDS - started) ))
checks=$(( left < 200 ? left / 2 : 170 ))
timeout -k 10 "$checks" "$python" benchmarks/gpu_checks.py --out "$out/gpu_checks" --budget-s $(( checks - 20 )) \
    ${CHECKS_ARGS:-} > "$out/gpu_checks.log" 2>&1
echo "gpu_checks: exit $? after $(( SECONDS - started )) s"

left=$(( total - (SECONDS - started) ))
if (( left > 60 )); then
    timeout -k 10 "$left" "$python" benchmarks/gpu_suite.py --out "$out/gpu_suite" --budget-s $(( left - 30 )) \
        ${SUITE_ARGS:-} > "$out/gpu_suite.log" 2>&1
    echo "gpu_suite: exit $? after $(( SECONDS - started )) s"
fi
tail -n 40 "$out/gpu_checks/results.md" 2>/dev/null
tail -n 60 "$out/gpu_suite/results.md" 2>/dev/null
