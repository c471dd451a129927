"""How tests/data/img2dataset/ was made: the real img2dataset tool over a loopback HTTP server.

img2dataset 1.47 pins webdataset<0.3, opencv<5 and pandas<3, which clash with recompose's own
dependencies, so it is not a test dependency: this script ran once in a separate virtualenv
(`python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset==1.47.0`) and its small output
is committed. Run: /tmp/i2d/bin/python tests/data/make_img2dataset.py tests/data/img2dataset
"""

import http.server
import io
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from img2dataset import download
from PIL import Image


def main(out: Path) -> None:
    served = out.parent / "_served"
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        a = np.zeros((40, 56, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        a[10:30, 10 + 4 * i : 30 + 4 * i] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=90)
        (served / f"img{i}.jpg").write_bytes(buf.getvalue())
    (served / "broken.jpg").write_bytes(b"this is not an image")

    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/img{i}.jpg" for i in range(6)] + [f"{base}/missing.jpg", f"{base}/broken.jpg"]
    captions = [f"picture number {i}" for i in range(6)] + ["a 404", "not an image"]
    url_list = out.parent / "_urls.parquet"
    pd.DataFrame({"url": urls, "caption": captions}).to_parquet(url_list)
    for fmt in ("webdataset", "parquet"):
        shutil.rmtree(out / fmt, ignore_errors=True)
        download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format=fmt,
            output_folder=str(out / fmt),
            image_size=32,
            resize_mode="center_crop",
            processes_count=1,
            thread_count=2,
            number_sample_per_shard=5,
            timeout=5,
            retries=0,
            enable_wandb=False,
            distributor="multiprocessing",
        )
    server.shutdown()
    shutil.rmtree(served)
    url_list.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
