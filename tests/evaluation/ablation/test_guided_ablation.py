"""The ablation runner with guided diffusion: plugin options and sweeps from YAML reach the plugin,
each run records the guide's counters, and the FLOPs include the guide's forwards."""

from dare_pipeline.cli import main
from dare_pipeline.evaluation.ablation.results import read_records


def test_guided_runs_record_the_guides_work(write_ablation, tmp_path):
    path = write_ablation(plugins={"sets": [["guided_diffusion"], ["dual_cache", "guided_diffusion"]]},
                          plugin_options={"guided_diffusion": {"verify_window": 8}, "dual_cache": {"head_commit": "off"}},
                          sweep={"plugins.guided_diffusion.also_commit_above": [None, 0.9]})
    out = tmp_path / "results.jsonl"
    assert main(["ablate", str(path), "--output", str(out), "--quiet", "--report-dir", str(tmp_path / "rep")]) == 0
    records = read_records(out)
    assert len(records) == 4
    for r in records:
        assert r["status"] == "ok", r.get("error")
        options = next(p for p in r["recipe"]["plugins"] if p["name"] == "guided_diffusion")
        assert options["verify_window"] == 8 and options["also_commit_above"] == r["sweep"][
            "plugins.guided_diffusion.also_commit_above"]
        guided = r["metrics"]["plugins"]["guided_diffusion"]
        assert guided["guide_forwards"] > 0 and 0 <= guided["fallback_rate"] <= 1
        flops = r["metrics"]["flops"]
        assert flops["guide"] == guided["guide_flops"] > 0
        assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert (tmp_path / "rep" / "report.md").is_file()
