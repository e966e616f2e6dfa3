"""Image folders: one subfolder per class, directly or under train/ (val/) test/ folders."""


import numpy as np

from keffconvert.data.splits import stratified_split
from keffconvert.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def find_split_folder(root, split):
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def list_image_folder(root):
    """(class names, [(path, class index)]) for `root/<class>/<image>`; DataError when unusable."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} holds no class subfolders (expected {root}/<class>/<image>)")
    files = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, index) for p in found]
    if len(classes) < 2:
        raise DataError(f"{root} holds only one class ({classes[0]}); need at least two")
    return classes, files


def open_folder(root, image_shape, *, val_split, test_split, seed):
    """The `StreamDataset` of an image folder: file lists per split, nothing decoded yet."""
    from keffconvert.data.stream import FileSplit, StreamDataset

    names, parts, description = folder_files(root, test_split, seed)
    if "val" not in parts:
        paths, labels = parts["train"]
        kept, held = stratified_split(labels, val_split, seed)
        if len(held) == 0:
            raise DataError(f"too few images ({len(labels)}) to hold out a validation split of {val_split:.0%}")
        parts["train"], parts["val"] = (paths[kept], labels[kept]), (paths[held], labels[held])
        description["val_source"] = f"{val_split:.0%} of the training images, stratified, seed {seed}"
    else:
        description["val_source"] = "the data's own validation split"
    description.update(image_size=list(image_shape), classes=len(names), class_names=list(names),
                       **{s: int(len(parts[s][1])) for s in ("train", "val", "test")}, streamed=True)
    splits = {s: FileSplit(*parts[s]) for s in ("train", "val", "test")}
    return StreamDataset(splits, list(names), tuple(image_shape), description)


def folder_files(root, test_split, seed):
    """(class names, {split: (paths, labels)}, description) of an image folder, split as documented
    at the top: the folder's own train/test (and val) folders, or a stratified, seeded hold-out."""
    train_root = find_split_folder(root, "train")
    test_root = find_split_folder(root, "test")
    if (train_root is None) != (test_root is None):
        raise DataError(f"{root} has a {'train' if train_root else 'test'} folder but no "
                        f"{'test' if train_root else 'train'} folder")

    def arrays(files):
        return np.array([str(p) for p, _ in files]), np.array([c for _, c in files], dtype=np.int64)

    if train_root is None:
        if not any(root.iterdir()):
            raise DataError(f"{root} is empty (expected {root}/<class>/<image>)")
        names, files = list_image_folder(root)
        paths, labels = arrays(files)
        kept, held = stratified_split(labels, test_split, seed)
        if len(held) == 0:
            raise DataError(f"too few images ({len(labels)}) to hold out a test split of {test_split:.0%}")
        description = {
            "source": str(root),
            "kind": f"image folder, {len(names)} classes, {len(files)} images",
            "test_source": f"the folder has no test split: {test_split:.0%} of its images held out, "
                           f"stratified, seed {seed}; never used for model selection",
        }
        return names, {"train": (paths[kept], labels[kept]), "test": (paths[held], labels[held])}, description

    names, train_files = list_image_folder(train_root)
    parts = {"train": arrays(train_files)}
    val_root = find_split_folder(root, "val")
    for split, folder in (("val", val_root), ("test", test_root)):
        if folder is None:
            continue
        split_names, split_files = list_image_folder(folder)
        unknown = sorted(set(split_names) - set(names))
        if unknown:
            raise DataError(f"{folder} has classes not in {train_root}: {', '.join(unknown[:5])}")
        parts[split] = arrays([(p, names.index(split_names[c])) for p, c in split_files])
    description = {
        "source": str(root),
        "kind": f"image folder with train/test splits, {len(names)} classes",
        "test_source": f"{test_root}; never used for model selection",
    }
    return names, parts, description
