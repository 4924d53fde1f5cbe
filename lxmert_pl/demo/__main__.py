"""Start the demo page: `python -m lxmert_pl.demo [--ckpt ...] [--detector ...] [--port N] [--host 127.0.0.1]`.

On the bundled demo weights by default (nothing is downloaded). It prints the local URL and serves on 127.0.0.1
unless told otherwise; it never makes a public share link and sends no usage statistics.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from lxmert_pl.errors import UserInputError  # noqa: E402
from lxmert_pl.runs.errors import user_errors  # noqa: E402

PROGRAM = "python -m lxmert_pl.demo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="demo-lxrt",
                        help="LXMERT weights: registry alias or path (default: %(default)s)")
    parser.add_argument("--detector", default="demo-frcnn", help="detector alias or directory (default: %(default)s)")
    parser.add_argument("--mode", choices=("itm", "cosine"), default=None,
                        help="score shown first (default: itm, the matching head; cosine for a checkpoint without "
                             "one, e.g. a VQA fine-tuned one; with a matching head the page switches between both)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine "
                                                            "only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s; 0: any free port)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: 1 with the bundled demo weights, whose operations are "
                             "too small to share out, else torch's default)")
    parser.add_argument("--max-megapixels", type=float, default=40.0,
                        help="largest image the page takes, in megapixels (default: %(default)s)")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace):
    """Load the weights, serve the page without blocking and say where it is; returns the app (`app.close()`)."""
    if not 0 <= args.port < 65536:
        raise UserInputError(f"--port {args.port}: expected 0..65535")
    if not args.max_megapixels > 0:
        raise UserInputError(f"--max-megapixels {args.max_megapixels}: expected a positive number")
    if args.threads is not None and args.threads < 1:
        raise UserInputError(f"--threads {args.threads}: expected 1 or more")
    start = time.perf_counter()
    import torch

    from lxmert_pl.demo.app import describe_weights, launch_app, load_demo

    bundled = describe_weights(args.ckpt)[1] and describe_weights(args.detector)[1]
    threads = args.threads or (1 if bundled else None)
    if threads:
        torch.set_num_threads(threads)

    app, report = load_demo(args.ckpt, args.detector, mode=args.mode, device=args.device,
                            max_pixels=int(args.max_megapixels * 1e6))
    print(report, flush=True)
    url = launch_app(app, host=args.host, port=args.port)
    print(f"Demo page: {url}  (ready in {time.perf_counter() - start:.1f} s; Ctrl-C stops it)", flush=True)
    return app


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors(PROGRAM):
        app = serve(args)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
