"""`python -m sgl_jax.serve --config PATH [options] [--set section.key=value ...]`

Every EngineConfig / ServerConfig field can be overridden with `--set`; the common ones have their
own flags. `--help` lists every field with its type, default and doc. `--print-config` prints the
resolved configuration as YAML and exits without loading a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from sgl_jax.config import (Config, ConfigError, ServerConfig, leaf_fields, load_config, parse_value,
                             resolve_key)

# flag -> (section.key, how to read it)
_FLAGS = {
    "host": "server.host", "port": "server.port", "model": "engine.model", "api_key": "server.api_key",
    "log_level": "server.log_level", "disable_radix_cache": "engine.cache.disable_radix_cache",
    "disable_hierarchical_cache": "engine.cache.disable_hierarchical_cache",
    "tp": "engine.parallel.tp", "dist_init_addr": "engine.parallel.dist_init_addr", "nnodes": "engine.parallel.nnodes",
    "node_rank": "engine.parallel.node_rank",
}


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fields_help() -> str:
    lines = ["configuration fields (override any with --set section.key=value; an engine field may also be",
             "named without its section, e.g. engine.page_size for engine.cache.page_size):"]
    for name, (sec, f, tp) in leaf_fields().items():
        path = f"engine.{sec}.{name}" if sec else f"engine.{name}"
        lines.append(f"  {path} ({getattr(tp, '__name__', str(tp))}, default {_default(f)!r})")
        lines.append(f"      {f.metadata.get('doc', '')}")
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        lines.append(f"  server.{f.name} ({getattr(hints[f.name], '__name__', hints[f.name])}, "
                     f"default {_default(f)!r})")
        lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def _parse_set(item: str) -> tuple[str, typing.Any]:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    section, path = resolve_key(key)
    name = path[-1]
    tp = leaf_fields()[name][2] if section == "engine" else typing.get_type_hints(ServerConfig)[name]
    full = ".".join((section,) + path)
    try:
        value = parse_value(text, tp)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"config key {full}: cannot read {text!r} as {getattr(tp, '__name__', tp)} ({e})") from None
    return full, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sgl_jax.serve", description="Serve a model over SGLang's HTTP API and the OpenAI API.",
        epilog=_fields_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset with 'engine:' and 'server:' sections (see configs/)")
    p.add_argument("--host", help="server.host")
    p.add_argument("--port", type=int, help="server.port")
    p.add_argument("--model", help="engine.model")
    p.add_argument("--api-key", dest="api_key", help="server.api_key")
    p.add_argument("--disable-radix-cache", dest="disable_radix_cache", action="store_true", default=None,
                   help="engine.cache.disable_radix_cache=true")
    p.add_argument("--disable-hierarchical-cache", dest="disable_hierarchical_cache", action="store_true",
                   default=None, help="engine.cache.disable_hierarchical_cache=true (device pool only)")
    p.add_argument("--log-level", dest="log_level", help="server.log_level")
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, help="engine.parallel.tp (tensor-parallel devices)")
    p.add_argument("--dist-init-addr", dest="dist_init_addr",
                   help="engine.parallel.dist_init_addr (host:port of rank 0)")
    p.add_argument("--nnodes", type=int, help="engine.parallel.nnodes (processes serving one model)")
    p.add_argument("--node-rank", dest="node_rank", type=int, help="engine.parallel.node_rank (0 serves HTTP)")
    p.add_argument("--replicas", type=int, default=0,
                   help="serve N data-parallel replicas as a Ray Serve application behind one endpoint, routed by "
                        "estimated prefill cost with late binding (needs `pip install sgl_jax[ray]`; "
                        "RAY_ADDRESS=auto to join a running cluster)")
    p.add_argument("--routing-policy", dest="routing_policy", default="cost",
                   choices=("cost", "round_robin", "ray_pow2"),
                   help="with --replicas: how requests are placed (ray_pow2: Ray Serve's default router, to compare)")
    p.add_argument("--router-option", dest="router_options", action="append", default=[], metavar="KEY=VALUE",
                   help="with --replicas: a setting of our router (max_inflight, prefill_chunk, decode_weight, "
                        "max_bypass, copy_weight; see sgl_jax/router/policy.py)")
    p.add_argument("--ray-actor-options", dest="ray_actor_options", default=None,
                   help='with --replicas: JSON resources of each replica, e.g. \'{"num_gpus": 1}\' '
                        '(default \'{"num_cpus": 1}\')')
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, typing.Any] = {}
    try:
        for group in args.overrides:
            for item in group:
                key, value = _parse_set(item)
                overrides[key] = value
        for flag, key in _FLAGS.items():
            v = getattr(args, flag)
            if v is not None:
                overrides[key] = v
        cfg = load_config(args.config, overrides)
    except (ConfigError, OSError) as e:
        parser.error(str(e))
    return cfg, args


def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(argv)
    if args.print_config:
        import yaml

        yaml.safe_dump({"engine": dataclasses.asdict(cfg.engine), "server": dataclasses.asdict(cfg.server)},
                       sys.stdout, sort_keys=False)
        return
    if cfg.engine.parallel.node_rank > 0:  # multi-host: this rank follows rank 0's steps; rank 0 serves HTTP
        import logging

        from sgl_jax.parallel.multihost import serve_follower

        logging.basicConfig(level=cfg.server.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve_follower(cfg.engine)
        return
    if args.replicas:
        _run_replicas(cfg, args)
        return
    from sgl_jax.serve.server import run

    run(cfg)


def _run_replicas(cfg: Config, args: argparse.Namespace) -> None:
    import json

    if cfg.engine.parallel.nnodes > 1:
        sys.exit("--replicas and multi-host (engine.parallel.nnodes > 1) do not combine yet: each replica is one "
                 "process (it may use tp over its own devices)")
    try:
        options = json.loads(args.ray_actor_options) if args.ray_actor_options else None
    except ValueError as e:
        sys.exit(f"--ray-actor-options is not JSON: {e}")
    known = {"max_inflight": int, "prefill_chunk": int, "decode_weight": float, "max_bypass": int, "copy_weight": float}
    router_options = {}
    for item in args.router_options:
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            sys.exit(f"--router-option expects KEY=VALUE with KEY one of {', '.join(known)}; got {item!r}")
        try:
            router_options[key] = known[key](value)
        except ValueError:
            sys.exit(f"--router-option {key}: cannot read {value!r} as {known[key].__name__}")
    try:
        from sgl_jax.serve.ray_app import run
    except ImportError as e:
        sys.exit(f"--replicas needs Ray Serve ({e}); install it with: pip install 'sgl_jax[ray]'")
    run(cfg, args.replicas, policy=args.routing_policy, actor_options=options, router_options=router_options)


if __name__ == "__main__":
    main()
