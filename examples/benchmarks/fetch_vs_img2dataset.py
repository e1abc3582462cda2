"""End-to-end throughput of `gitcap fetch` against img2dataset on the same loopback server.

A local aiohttp server (its own process) serves real photographs -- the sample photos
scikit-image ships, re-encoded as JPEGs of 500-1280 px on the long side -- at 6,000
distinct URLs. Both tools download them all, resize to 256 (shortest side, keep ratio),
re-encode at JPEG quality 95 and write 500-row webdataset shards, one after the other,
each with 2 processes. Printed per tool: wall time, images/s, CPU-seconds per image
(the tool's whole process tree, server excluded) and the peak RSS of that tree. Then a
per-image breakdown of where the CPU goes (decode, resize, encode) for both decoders.

Run it from a virtual environment that has img2dataset and scikit-image (benchmark-only
dependencies, not gitcap's), pointing at the Python that has gitcap:

    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install img2dataset==1.47.0 scikit-image aiohttp
    /tmp/bench-venv/bin/python examples/benchmarks/fetch_vs_img2dataset.py \\
        --gitcap-python .venv/bin/python --images 6000

gitcap's side alone runs in gitcap's own environment (no img2dataset, no scikit-image:
synthetic pictures instead of the sample photos), e.g. to compare two gitcap versions:

    python examples/benchmarks/fetch_vs_img2dataset.py --only gitcap --images 3000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle"]
LONG_SIDES = [500, 640, 800, 1024, 1280]


def sample_photos() -> list[tuple[str, "Image.Image"]]:
    """scikit-image's sample photos; without scikit-image (gitcap's own environment),
    textured synthetic pictures of the same sizes: the numbers then compare gitcap runs
    with each other, not with the README's table."""
    from PIL import Image, ImageFilter

    try:
        import skimage.data
    except ImportError:
        pictures = []
        for i, name in enumerate(PHOTOS):
            base = Image.effect_mandelbrot((1280, 960), (-2.0 + 0.1 * i, -1.2, 1.0, 1.2), 60 + 10 * i)
            noise = Image.effect_noise((1280, 960), 40 + 5 * i)
            grey = Image.blend(base, noise, 0.35).filter(ImageFilter.SMOOTH)
            pictures.append((f"synthetic-{name}", Image.merge("RGB", (grey, base, noise))))
        return pictures
    photos = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        photos.append((name, Image.fromarray(arr).convert("RGB")))
    return photos


def make_photos(folder: Path) -> list[Path]:
    """Sample photos at several sizes, as JPEG files (q90, like typical web images)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, im in sample_photos():
        for long_side in LONG_SIDES:
            scale = long_side / max(im.size)
            resized = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            path = folder / f"{name}_{long_side}.jpg"
            resized.save(path, "JPEG", quality=90)
            paths.append(path)
    return paths


SERVER = r'''
import sys
from pathlib import Path
from aiohttp import web
bodies = [p.read_bytes() for p in sorted(Path(sys.argv[1]).glob("*.jpg"))]
async def handle(request):
    i = int(request.match_info["i"])
    return web.Response(body=bodies[i % len(bodies)], content_type="image/jpeg")
app = web.Application()
app.router.add_get("/img/{i}.jpg", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
'''


def start_server(photos: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(photos), str(port)])
    import urllib.request
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/img/0.jpg", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def measure(cmd: list[str], label: str) -> dict:
    """Run a tool; wall time, CPU of its whole (reaped) process tree, peak tree RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-3000:])
        raise RuntimeError(f"{label} failed with exit {proc.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"tool": label, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / 2**20}


def count_ok_in_tars(folder: Path) -> int:
    import tarfile
    n = 0
    for tar in folder.rglob("*.tar"):
        with tarfile.open(tar) as t:
            n += sum(1 for m in t if m.name.endswith(".jpg"))
    return n


def breakdown(photos: list[Path], size: int = 256, quality: int = 95) -> dict:
    """Per-image CPU milliseconds of each stage, averaged over the photo set."""
    try:
        import cv2
        import numpy as np
    except ImportError:  # gitcap's own environment: its side only
        cv2 = None
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from gitcli.formats.images import ImageSettings, normalize_image

    bodies = [p.read_bytes() for p in photos]
    reps = 5
    t: dict[str, float] = {}

    def timed(name, fn):
        start = time.process_time()
        for _ in range(reps):
            for b in bodies:
                fn(b)
        t[name] = (time.process_time() - start) / (reps * len(bodies)) * 1000

    def full_decode(b):
        im = Image.open(io.BytesIO(b)); im.load(); return im

    def draft_decode(b):
        im = Image.open(io.BytesIO(b))
        s = size / min(im.size)
        im.draft("RGB", (round(im.width * s), round(im.height * s)))
        im.load()
        return im

    full = [full_decode(b) for b in bodies]
    drafted = [draft_decode(b) for b in bodies]

    def target(im):
        s = size / min(im.size)
        return round(im.width * s), round(im.height * s)

    timed("pil_full_decode", full_decode)
    timed("pil_draft_decode", draft_decode)
    start = time.process_time()
    for _ in range(reps):
        for im in full:
            im.resize(target(im), Image.BICUBIC)
    t["pil_resize_bicubic_from_full"] = (time.process_time() - start) / (reps * len(full)) * 1000
    start = time.process_time()
    small = []
    for _ in range(reps):
        small = [im.resize(target(im), Image.BICUBIC) for im in drafted]
    t["pil_resize_bicubic_from_draft"] = (time.process_time() - start) / (reps * len(drafted)) * 1000
    start = time.process_time()
    for _ in range(reps):
        small = [im.resize(target(im), Image.BOX) for im in drafted]
    t["pil_resize_box_from_draft"] = (time.process_time() - start) / (reps * len(drafted)) * 1000
    start = time.process_time()
    for _ in range(reps):
        for im in small:
            im.save(io.BytesIO(), "JPEG", quality=quality)
    t["pil_encode_q95"] = (time.process_time() - start) / (reps * len(small)) * 1000
    settings = ImageSettings(resize=size, mode="keep-ratio", jpeg_quality=quality)
    timed("gitcap_normalize_total", lambda b: normalize_image(b, settings))

    if cv2 is None:
        return t
    # img2dataset's path: cv2 full decode, INTER_AREA resize, cv2 encode
    cv2.setNumThreads(1)
    timed("cv2_full_decode", lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED))
    arrays = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED) for b in bodies]
    start = time.process_time()
    outs = []
    for _ in range(reps):
        outs = []
        for a in arrays:
            h, w = a.shape[:2]
            s = size / min(h, w)
            outs.append(cv2.resize(a, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA))
    t["cv2_resize_area"] = (time.process_time() - start) / (reps * len(arrays)) * 1000
    start = time.process_time()
    for _ in range(reps):
        for a in outs:
            cv2.imencode(".jpg", a, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    t["cv2_encode_q95"] = (time.process_time() - start) / (reps * len(outs)) * 1000
    return t


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gitcap-python", default=sys.executable, help="a Python that can import gitcli")
    ap.add_argument("--img2dataset", default=str(Path(sys.executable).with_name("img2dataset")))
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=128, help="gitcap --concurrency and img2dataset --thread_count")
    ap.add_argument("--port", type=int, default=18931)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--only", choices=["gitcap", "img2dataset"], default=None)
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    photos = make_photos(work / "photos")
    tsv = work / "urls.tsv"
    with open(tsv, "w") as f:
        f.write("caption\turl\n")  # img2dataset needs a header; gitcap is told with --header
        for i in range(args.images):
            f.write(f"photo number {i}\thttp://127.0.0.1:{args.port}/img/{i}.jpg\n")
    server = start_server(work / "photos", args.port)
    results = []
    try:
        if args.only in (None, "img2dataset"):
            out = work / "img2dataset"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [args.img2dataset, f"--url_list={tsv}", "--input_format=tsv", "--url_col=url",
                   "--caption_col=caption", "--output_format=webdataset", f"--output_folder={out}",
                   f"--processes_count={args.processes}", f"--thread_count={args.concurrency}",
                   "--image_size=256", "--resize_mode=keep_ratio", "--encode_quality=95",
                   "--number_sample_per_shard=500", "--retries=0", "--timeout=10",
                   "--distributor=multiprocessing", "--enable_wandb=False"]
            r = measure(cmd, "img2dataset 1.47.0")
            r["load_before"] = load_average()
            r["ok"] = count_ok_in_tars(out)
            results.append(r)
        if args.only in (None, "gitcap"):
            out = work / "gitcap"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [args.gitcap_python, "-m", "gitcli", "fetch", str(tsv), "--out", str(out), "--header",
                   "--caption-column", "caption", "--url-column", "url", "--shard-size", "500",
                   "--resize", "256", "--resize-mode", "keep-ratio", "--jpeg-quality", "95",
                   "--processes", str(args.processes), "--concurrency", str(args.concurrency),
                   "--per-host", str(args.concurrency), "--retries", "0", "--timeout", "10",
                   "--allow-address", "127.0.0.1", "--no-progress"]
            env_cwd = str(REPO)
            os.chdir(env_cwd)
            r = measure(cmd, "gitcap fetch")
            r["load_before"] = load_average()
            r["ok"] = count_ok_in_tars(out)
            results.append(r)
    finally:
        server.terminate()
        server.wait()

    print(f"\n{args.images} images, {os.cpu_count()} CPUs, resize 256 keep-ratio, q95, 500 rows/shard, {args.processes} processes\n")
    print(f"| tool | ok | wall s | images/s | CPU-s/image | peak RSS (tree) |")
    print(f"|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tool']} | {r['ok']} | {r['wall_s']:.1f} | {r['ok'] / r['wall_s']:.0f} | "
              f"{r['cpu_s'] / max(r['ok'], 1) * 1000:.1f} ms | {r['peak_rss_mb']:.0f} MiB |")
    if len(results) == 2:
        a, b = results
        print(f"\nspeed-up (images/s): {(b['ok'] / b['wall_s']) / (a['ok'] / a['wall_s']):.2f}x; "
              f"CPU-s/image ratio: {(a['cpu_s'] / a['ok']) / (b['cpu_s'] / b['ok']):.2f}x")
    print("\nper-image CPU ms by stage (single process, this photo set):")
    for k, v in breakdown(photos).items():
        print(f"  {k:24s} {v:6.2f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
