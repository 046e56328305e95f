"""python -m vkern info | demo [--size tiny|1.3b|14b] [--res 480p|720p]"""
import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vkern")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build, GPU and the backend each op would use")
    demo = sub.add_parser("demo", help="patch a random-weight Wan pipeline and compare with unpatched")
    demo.add_argument("--size", default="tiny", choices=["tiny", "1.3b", "14b"])
    demo.add_argument("--res", default=None, choices=["tiny", "480p", "720p"])
    demo.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
    else:
        from . import demo as demo_mod

        demo_mod.run(args.size, args.res, args.device)


if __name__ == "__main__":
    main()
