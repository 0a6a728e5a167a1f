"""Screenshots of what a Prefect user sees of merit, from a real server, worker and run.

    /work/main/.venv/bin/python bench/ui/screenshots.py            # or .venv/bin/python
    .venv/bin/python bench/ui/screenshots.py --port 4300 --out docs/ui --keep

1. starts a Prefect server the README's way, `bash scripts/prefect-server.sh --port PORT`
   (a non-default port, 4300, with the UI on) in a temporary PREFECT_HOME, and checks
   that the UI is told to call the API on that port (`/ui-settings`);
2. `bash deployments/create-pools.sh`, a process worker (`--limit 4`), and
   `prefect --no-prompt deploy --name full --name process` from the repository root;
3. a tiny model (the tests' random 2-layer Llama and byte-level BPE tokenizer, built in
   code: no downloads) and a tiny config of 4 JSONL sources, K = 2, in the temporary
   directory; `prefect deployment run merit/full --params {"config_path": ...} --watch`;
4. headless Chromium (Playwright, in its own venv: --pw-python) takes, at 1400x900:
   - docs/ui/run-form.png        Deployments -> merit/full -> Run (the custom run page), top
   - docs/ui/run-form-path.png   the same page at `config_path` / `overrides`
   - docs/ui/flow-run.png        the merit/full flow run: its graph, tab "Subflow Runs" (one
                                 merit-branch flow run per branch)
   - docs/ui/report.png          the merit-report artifact (report.md), top
   - docs/ui/report-images.png   the same at its first image (heat map, PCA); prints how many
                                 of its images the browser loaded
   - docs/ui/automation.png      Automations: the trigger prefect.yaml creates
   PNGs over --max-kb are re-encoded with a 256-colour palette (Pillow).
5. stops every process it started (by PID / process group) and removes the temporary
   directory (unless --keep).

Prints each phase's wall time, each screenshot's size, and the command to reproduce.
Needs: the project venv (prefect, merit, tests/), `chromium` (Debian: apt-get install -y
chromium) and Playwright in another venv (python3 -m venv /tmp/pw-venv &&
/tmp/pw-venv/bin/pip install playwright); see bench/ui/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.helpers, tests.conftest (tiny model, JSONL sources)

SOURCES = ["arith", "trivia", "translate", "summarise"]


def _chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no chromium found: apt-get install -y chromium (or pass --chromium PATH)")


class Procs:
    """Processes started here, each in its own process group, stopped by PID at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (the child writes it until stopped)
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((name, p))
        return p

    def tail(self, name: str, n: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop_all(self) -> None:
        for _name, p in reversed(self.started):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the group of a process started here
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait_healthy(base: str, proc: subprocess.Popen, procs: Procs, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the Prefect server exited ({proc.returncode}):\n{procs.tail('server')}")
        try:
            if _get_json(f"{base}/api/health") is True:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the Prefect server at {base} was not healthy after {timeout:.0f} s")


def _tiny_inputs(tmp: Path) -> Path:
    """The tests' tiny random Llama + tokenizer saved as an HF dir, 4 JSONL sources and a
    config that trains K = 2 branches for 2 steps each (what tests/test_e2e.py runs)."""
    import yaml

    from tests.conftest import build_tiny_llama, build_tiny_tokenizer
    from tests.helpers import write_jsonl_sources

    tok = build_tiny_tokenizer()
    model_dir = tmp / "tiny-base"
    build_tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    raw = {
        "run": {"name": "ui-demo"},  # branch_execution=deployment comes from merit/full's `overrides`
        "model": {"source": str(model_dir)},
        "data": {"sources": write_jsonl_sources(tmp / "data", SOURCES, n=24),
                 "max_length": 64, "heldout_min": 4, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 256, "batch_size": 8},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-3, "batch_size": 8, "max_steps": 2, "save_steps": 100, "logging_steps": 1,
                  "threads": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 2},
        "store": {"uri": str(tmp / "store")},
        "baselines": {"joint": False, "random_split": False},
    }
    path = tmp / "ui-demo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _shrink(path: Path, max_kb: int) -> None:
    if path.stat().st_size <= max_kb * 1024:
        return
    from PIL import Image

    with Image.open(path) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=4300, help="server port (default 4300: not Prefect's 4200)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ui", help="where the PNGs go (docs/ui)")
    ap.add_argument("--pw-python", default=os.environ.get("PW_PYTHON", "/tmp/pw-venv/bin/python"),
                    help="python of a venv with playwright (default /tmp/pw-venv/bin/python, or $PW_PYTHON)")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: the system chromium)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--max-kb", type=int, default=300, help="re-encode PNGs larger than this (palette)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, store, PREFECT_HOME)")
    ap.add_argument("--serve", action="store_true",
                    help="after the screenshots, keep server and worker running until Ctrl-C (to look around)")
    args = ap.parse_args()

    t_start = time.monotonic()
    if not Path(args.pw_python).exists():
        raise SystemExit(f"{args.pw_python} not found: python3 -m venv /tmp/pw-venv && "
                         "/tmp/pw-venv/bin/pip install playwright (or pass --pw-python)")
    chromium = args.chromium or _chromium()
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(f"port {args.port} is in use; pass --port N")

    tmp = Path(tempfile.mkdtemp(prefix="merit-ui-"))
    (tmp / "logs").mkdir()
    (tmp / "prefect-home").mkdir()
    base = f"http://127.0.0.1:{args.port}"
    py_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_CLI_WRAP_LINES="false",
        MERIT_CACHE_DIR=str(tmp / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PATH=f"{py_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        PREFECT=str(Path(py_bin) / "prefect"),
    )
    procs = Procs(tmp / "logs")
    timings: dict[str, float] = {}
    shots_done: list[tuple[Path, int]] = []
    images = "report images: not checked"
    try:
        # 1. The server, started as the README says (the script sets the UI's API URL).
        t0 = time.monotonic()
        server = procs.start("server", ["bash", "scripts/prefect-server.sh", "--port", str(args.port)], env)
        _wait_healthy(base, server, procs)
        ui_api = _get_json(f"{base}/ui-settings")["api_url"]
        if ui_api != f"{base}/api":
            raise SystemExit(f"the UI would call {ui_api}, not {base}/api: scripts/prefect-server.sh is broken")
        timings["server"] = time.monotonic() - t0
        env["PREFECT_API_URL"] = f"{base}/api"  # the line the server script printed

        # 2. Pools, a worker, the CPU deployments.
        t0 = time.monotonic()
        _run(["bash", "deployments/create-pools.sh"], env)
        procs.start("worker", [env["PREFECT"], "worker", "start", "--pool", "merit-process", "--type", "process",
                               "--limit", "4", "--name", "ui-worker"], env)
        _run([env["PREFECT"], "--no-prompt", "deploy", "--name", "full", "--name", "process"], env)
        timings["pools + worker + deploy"] = time.monotonic() - t0

        # 3. A tiny run of merit/full, from the CLI as CI would.
        t0 = time.monotonic()
        config = _tiny_inputs(tmp)
        res = subprocess.run([env["PREFECT"], "deployment", "run", "merit/full",
                              "--params", json.dumps({"config_path": str(config)}),
                              "--watch", "--watch-interval", "2", "--watch-timeout", "900"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=960, check=False)
        timings["merit/full run"] = time.monotonic() - t0
        if res.returncode != 0:
            raise SystemExit(f"merit/full did not complete:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}\n"
                             f"--- worker log ---\n{procs.tail('worker', 80)}")

        # 4. Where the pages are.
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            ArtifactFilterKey,
            DeploymentFilter,
            DeploymentFilterId,
            DeploymentFilterName,
        )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), \
                get_client(sync_client=True) as client:
            (full,) = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["full"])))
            (parent,) = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[full.id])))
            reports = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["merit-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id])))
            (automation,) = client.read_automations_by_name("merit/full on a new data source")
        if not reports:
            raise SystemExit(f"flow run {parent.name} published no merit-report artifact")
        report_id = reports[0].id

        ui = f"{base}/v2"
        refuse = ["Something went wrong"]
        args.out.mkdir(parents=True, exist_ok=True)
        report_imgs = ".prose img"  # the markdown's images (the UI renders markdown in .prose)
        def shot(page: str, png: str, **how) -> dict:
            return {"url": f"{ui}/{page}", "path": str(args.out / png), "refuse": refuse, **how}

        shots = [
            shot(f"deployments/deployment/{full.id}/run", "run-form.png", wait_for=["config_path"]),
            shot(f"deployments/deployment/{full.id}/run", "run-form-path.png", wait_for=["config_path"],
                 scroll_to="config_path"),
            shot(f"runs/flow-run/{parent.id}", "flow-run.png", wait_for=[parent.name, "Completed"],
                 click=["Subflow Runs"], wait_after_click=["merit-branch"], settle_ms=4000),
            shot(f"artifacts/artifact/{report_id}", "report.png", wait_for=["merit-report"], settle_ms=3000),
            shot(f"artifacts/artifact/{report_id}", "report-images.png", wait_for=["merit-report"],
                 scroll_to_selector=report_imgs, check_images=report_imgs, settle_ms=3000),
            shot(f"automations/automation/{automation.id}", "automation.png",
                 wait_for=["merit/full on a new data source"]),
        ]
        spec = tmp / "shots.json"
        spec.write_text(json.dumps({"chromium": chromium, "width": args.width, "height": args.height,
                                    "shots": shots}))
        t0 = time.monotonic()
        shoot = subprocess.run([args.pw_python, str(REPO / "bench" / "ui" / "shoot.py"), str(spec)],
                               capture_output=True, text=True, timeout=600, check=False)
        print(shoot.stdout, end="")
        if shoot.returncode != 0:
            raise SystemExit(f"screenshots failed:\n{shoot.stderr[-4000:]}")
        for line in shoot.stdout.splitlines():
            if line.startswith("IMAGES "):
                loaded, total = line.split()[-1].split("/")
                images = f"report images loaded in the browser: {loaded} of {total}"
                if loaded != total or total == "0":
                    images = "WARNING: " + images + " (report.md's images do not render in the artifact)"
        for shot in shots:
            path = Path(shot["path"])
            _shrink(path, args.max_kb)
            shots_done.append((path, path.stat().st_size))
        timings["screenshots"] = time.monotonic() - t0

        if args.serve:
            print(f"\nUI: {base}  (server and worker keep running; Ctrl-C stops them)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp} (logs/, store/, prefect-home/)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    total = time.monotonic() - t_start
    print("\nmeasured (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f", total {total:.1f}")
    for path, size in shots_done:
        print(f"  {path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {size / 1024:.0f} KB")
    print(images)
    print(f"reproduce: {Path(sys.executable).relative_to(REPO) if Path(sys.executable).is_relative_to(REPO) else sys.executable} "
          f"bench/ui/screenshots.py --port {args.port}")


if __name__ == "__main__":
    main()
