"""The revisited Oxford / Paris datasets on disk (revisitop layout):

    <data_path>/<dataset>/gnd_<dataset>.pkl     dataset = roxford5k | rparis6k
    <data_path>/<dataset>/jpg/<name>.jpg        every name of imlist and qimlist

The pickle holds `imlist` (database names), `qimlist` (query names) and
`gnd`, one dict per query with `bbx` (x1, y1, x2, y2: the query region in
the query image), `easy`, `hard`, `junk` (database indices). `data_path`
may also be the dataset folder itself.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

DATASETS = ("roxford5k", "rparis6k")
_GND_KEYS = ("bbx", "easy", "hard", "junk")


@dataclass
class RevisitedDataset:
    name: str
    root: str             # the dataset folder
    imlist: list          # database image names (no extension)
    qimlist: list         # query image names
    gnd: list             # per query {"bbx", "easy", "hard", "junk"}

    def db_paths(self) -> list[str]:
        return [os.path.join(self.root, "jpg", n + ".jpg") for n in self.imlist]

    def query_paths(self) -> list[str]:
        return [os.path.join(self.root, "jpg", n + ".jpg") for n in self.qimlist]

    def query_boxes(self) -> list:
        return [g["bbx"] for g in self.gnd]


def _find_root(data_path: str, dataset: str | None) -> tuple[str, str]:
    """(dataset folder, dataset name)."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"{data_path}: no such folder (--data_path). Expected the revisitop layout: "
                                "<data_path>/roxford5k/gnd_roxford5k.pkl and <data_path>/roxford5k/jpg/*.jpg")
    names = [dataset] if dataset else list(DATASETS)
    for name in names:
        for root in (os.path.join(data_path, name), data_path):
            if os.path.isfile(os.path.join(root, f"gnd_{name}.pkl")):
                return root, name
    want = dataset or "roxford5k"
    raise FileNotFoundError(
        f"{os.path.join(data_path, want, f'gnd_{want}.pkl')}: missing. The revisited protocol needs the "
        f"ground-truth file gnd_{want}.pkl (revisitop) in <data_path>/{want}/ next to its jpg/ folder")


def load_revisited(data_path: str, dataset: str | None = None) -> RevisitedDataset:
    """Read and check the dataset layout; errors name the file and what the
    protocol expects."""
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r}: the revisited protocol covers {', '.join(DATASETS)}")
    root, name = _find_root(data_path, dataset)
    gnd_file = os.path.join(root, f"gnd_{name}.pkl")
    try:
        with open(gnd_file, "rb") as f:
            cfg = pickle.load(f)
    except Exception as e:  # pickle raises many types on a damaged file
        raise ValueError(f"{gnd_file}: not a readable pickle ({type(e).__name__}: {e}); use the revisitop "
                         "gnd file as downloaded") from e
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{gnd_file}: lacks {missing}; a revisitop ground-truth pickle is a dict with "
                         "imlist, qimlist and gnd")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{gnd_file}: {len(gnd)} gnd entries for {len(qimlist)} queries (qimlist); "
                         "they must match one to one")
    for i, g in enumerate(gnd):
        lack = [k for k in _GND_KEYS if not isinstance(g, dict) or k not in g]
        if lack:
            raise ValueError(f"{gnd_file}: gnd[{i}] lacks {lack}; each query needs bbx, easy, hard and junk")
        for k in ("easy", "hard", "junk"):
            bad = [int(j) for j in g[k] if not 0 <= int(j) < len(imlist)]
            if bad:
                raise ValueError(f"{gnd_file}: gnd[{i}]['{k}'] holds index {bad[0]} outside the "
                                 f"{len(imlist)} database images")
        if len(g["bbx"]) != 4:
            raise ValueError(f"{gnd_file}: gnd[{i}]['bbx'] = {g['bbx']!r}; expected (x1, y1, x2, y2)")
    jpg = os.path.join(root, "jpg")
    if not os.path.isdir(jpg):
        raise FileNotFoundError(f"{jpg}: missing; the images of {name} go in jpg/ next to gnd_{name}.pkl")
    ds = RevisitedDataset(name, root, imlist, qimlist, gnd)
    absent = [p for p in ds.db_paths() + ds.query_paths() if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(f"{absent[0]}: missing ({len(absent)} of the images listed in {gnd_file} are "
                                f"not in {jpg}/); the protocol needs every database and query image")
    return ds
