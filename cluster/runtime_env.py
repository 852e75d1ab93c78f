"""What ``crossflow submit`` ships to the cluster: a Ray runtime environment built from ``cluster.*``.

``cluster.runtime_env`` picks one of Ray's ways of getting code and dependencies onto every node:

    working_dir  the repository (code and configs) is zipped, uploaded to the cluster and unpacked
                 on every node; the nodes already have the Python dependencies
    pip          the same, plus the pip requirements (``cluster.requirements``, else setup.cfg's
                 ``install_requires``), which Ray installs once per node in a virtualenv that sees
                 the node's own packages (so torch, ray... already there are not reinstalled)
    image        a container image (``cluster.image``, Ray's ``image_uri``) that holds the
                 repository at ``cluster.image_workdir`` and its dependencies; Ray runs the job's
                 driver and every worker in it (Ray allows no working_dir or pip beside image_uri)
    none         nothing shipped: every node sees the working directory at the same path (a shared
                 file system) with the dependencies installed

The job and every Ray Train worker it starts inherit this environment (Ray passes a job's
runtime_env to all its tasks and actors). Environment variables the workers need go with it:
the S3 endpoint and checksum policy, W&B's mode and project, Hugging Face's offline switches;
credentials only when named in ``cluster.env_vars``.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
from pathlib import Path

from data_pipeline.s3 import shareable_s3_env
from trainer.config import ClusterConfig, ConfigError

# Left behind when the working directory is shipped (gitignore patterns, relative to it), besides
# what its .gitignore / .rayignore name: environments, history, run outputs, caches, shards.
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "runs/", "wandb/", "__pycache__/", "*.pyc", ".pytest_cache/", ".cache/",
    "*.egg-info/", "build/", "dist/", "shard_cache/", "*.mds", "*.mds.zstd", "*.tar",
]
SHARD_INDEXES = ("index.json", "shardindex.json")  # an MDS / WebDataset shard folder holds one of these
# Copied from the submitting shell when set: what workers need to reach the same services. No credential.
SHARED_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "HF_HOME")
# The cluster's own Ray runs the job: a ray requirement would fight it (and Ray rewrites it anyway).
SKIPPED_REQUIREMENTS = ("ray",)


# ----------------------------------------------------------------------------- the working dir
def ray_package_limit() -> int:
    """Ray's largest working_dir package (bytes): the GCS's gRPC message size (512 MiB by default)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    return GCS_STORAGE_MAX_SIZE


def _ignore_spec(working_dir: Path, patterns: list[str]):
    """A gitignore matcher of ``patterns`` plus the working dir's .gitignore and .rayignore (as Ray reads them)."""
    from ray._private.thirdparty.pathspec import PathSpec
    lines = list(patterns)
    for name in (".gitignore", ".rayignore"):
        if (working_dir / name).is_file():
            lines += (working_dir / name).read_text().splitlines()
    return PathSpec.from_lines("gitwildmatch", lines)


def shipped_files(working_dir: Path, excludes: list[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, bytes) of every file Ray would ship, and the shard folders found (left out)."""
    spec = _ignore_spec(working_dir, excludes)
    files, shard_dirs = [], []
    for root, dirs, names in os.walk(working_dir):
        rel_root = Path(root).relative_to(working_dir)
        if rel_root != Path(".") and any((Path(root) / i).is_file() for i in SHARD_INDEXES):
            shard_dirs.append(f"/{rel_root.as_posix()}/")
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not spec.match_file(f"{(rel_root / d).as_posix()}/"))
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if not spec.match_file(rel) and (Path(root) / name).is_file():
                files.append((rel, (Path(root) / name).stat().st_size))
    return files, shard_dirs


def working_dir_excludes(working_dir: Path, cluster: ClusterConfig, limit_bytes: int | None = None) -> list[str]:
    """The ``excludes`` of the runtime_env: the defaults, ``cluster.working_dir_excludes``, the shard
    folders found and every file over ``cluster.max_file_mb`` (printed, so nothing goes missing
    unseen). Fails, naming the largest files, when what is left exceeds Ray's package limit."""
    excludes = [*DEFAULT_EXCLUDES, *cluster.working_dir_excludes]
    files, shard_dirs = shipped_files(working_dir, excludes)
    max_bytes = cluster.max_file_mb * 2**20
    large = [(rel, size) for rel, size in files if size > max_bytes]
    for rel, size in large:
        print(f"crossflow submit: {rel} ({size / 2**20:.1f} MiB > cluster.max_file_mb={cluster.max_file_mb:g}) "
              f"stays behind: put data and weights on s3:// or storage every node mounts")
    for d in shard_dirs:
        print(f"crossflow submit: shard folder {d.strip('/')} stays behind (data goes by data.path, not the code)")
    excludes += shard_dirs + [f"/{rel}" for rel, _ in large]
    kept = [(rel, size) for rel, size in files if size <= max_bytes]
    total = sum(size for _, size in kept)
    limit = ray_package_limit() if limit_bytes is None else limit_bytes
    if total >= limit:
        biggest = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for rel, size in sorted(kept, key=lambda x: -x[1])[:5])
        raise ConfigError(f"the working directory {working_dir} ships {total / 2**20:.1f} MiB, over Ray's working_dir "
                          f"limit of {limit / 2**20:.0f} MiB; largest files: {biggest}. Leave them out with "
                          f"cluster.working_dir_excludes=[...] or a .rayignore, or lower cluster.max_file_mb")
    print(f"crossflow submit: shipping {working_dir} ({len(kept)} files, {total / 2**20:.1f} MiB)")
    return excludes


# ----------------------------------------------------------------------------- pip requirements
def setup_cfg_requirements(setup_cfg: Path) -> list[str]:
    """``[options] install_requires`` of a setup.cfg, one requirement per entry, comments dropped."""
    if not setup_cfg.is_file():
        raise ConfigError(f"cluster.runtime_env=pip: no {setup_cfg} to take install_requires from; "
                          f"name a requirements file with cluster.requirements")
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    raw = parser.get("options", "install_requires", fallback="")
    reqs = [line.split("#", 1)[0].strip() for line in raw.splitlines()]
    return [r for r in reqs if r]


def requirements_file(path: Path) -> list[str]:
    """A pip requirements file's requirements (comments and blank lines dropped)."""
    if not path.is_file():
        raise ConfigError(f"cluster.requirements: no file {path}")
    reqs = [line.split(" #", 1)[0].strip() for line in path.read_text().splitlines()]
    return [r for r in reqs if r and not r.startswith("#")]


def _project_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pip_requirements(working_dir: Path, cluster: ClusterConfig) -> list[str]:
    """What Ray pip-installs on every node: ``cluster.requirements`` (a file inside the working dir)
    or setup.cfg's install_requires, without Ray itself (the cluster's Ray runs the job)."""
    if cluster.requirements:
        reqs = requirements_file(working_dir / cluster.requirements)
    else:
        reqs = setup_cfg_requirements(working_dir / "setup.cfg")
    return [r for r in reqs if _project_name(r) not in SKIPPED_REQUIREMENTS]


# ----------------------------------------------------------------------------- env vars
def job_env_vars(cluster: ClusterConfig) -> dict[str, str]:
    """The variables every process of the job gets: this shell's S3 endpoint/region/checksum policy,
    W&B and Hugging Face settings, and the variables ``cluster.env_vars`` names (which must be set)."""
    env = shareable_s3_env()
    env.update({k: os.environ[k] for k in SHARED_ENV if k in os.environ})
    missing = [k for k in cluster.env_vars if k not in os.environ]
    if missing:
        raise ConfigError(f"cluster.env_vars names {missing}, not set in this shell")
    env.update({k: os.environ[k] for k in cluster.env_vars})
    return env


# ----------------------------------------------------------------------------- runtime_env + entrypoint
def build_runtime_env(cluster: ClusterConfig, working_dir: str | Path, env_vars: dict[str, str],
                      limit_bytes: int | None = None) -> dict:
    """Ray's runtime_env for ``cluster.runtime_env`` (see the module docstring)."""
    working_dir = Path(working_dir).resolve()
    kind = cluster.runtime_env
    if kind == "image":
        return {"image_uri": cluster.image, "env_vars": env_vars}
    if kind == "none":
        return {"env_vars": env_vars}
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir} is not a directory")
    env = {"working_dir": str(working_dir), "excludes": working_dir_excludes(working_dir, cluster, limit_bytes),
           "env_vars": env_vars}
    if kind == "pip":
        env["pip"] = {"packages": pip_requirements(working_dir, cluster), "pip_check": False}
        print(f"crossflow submit: Ray pip-installs {len(env['pip']['packages'])} requirements on each node "
              f"(from {cluster.requirements or 'setup.cfg'}; packages a node has are kept)")
    return env


def job_entrypoint(cluster: ClusterConfig, config_rel: Path, overrides: list[str], working_dir: Path,
                   python: str = "python") -> str:
    """The job's shell command: ``python -m cluster.cli train ...`` run from the shipped code (Ray
    starts it in the unpacked working_dir; an image or a shared file system: ``cd`` there first)."""
    args = ["train", "--config", config_rel.as_posix(), *overrides]
    cmd = f"{python} -m cluster.cli " + " ".join(shlex.quote(a) for a in args)
    if cluster.runtime_env == "image":
        return f"cd {shlex.quote(cluster.image_workdir)} && {cmd}"
    if cluster.runtime_env == "none":
        return f"cd {shlex.quote(str(working_dir.resolve()))} && {cmd}"
    return cmd
