"""The published artefacts ``brainrecon download`` knows: real fMRI data and the lab's network weights.

Each entry has the name users type, where it is published (figshare), where it goes in the
download folder, and what it holds. Names with ``/`` form a tree: a prefix such as ``fmri/sub-01``
names every entry below it; ``paper-subject1`` etc. are named groups.

Download folder layout (``$BRAINRECON_HOME``, default ``~/.cache/brainrecon``)::

    fmri/sub-01_perceptionNaturalImageTraining_original_VC.h5     Shen et al. 2019 (figshare 7033577)
    fmri/sub-01_perceptionArtificialImage_original_VC.h5          shapes; also LetterImage, imagery
    fmri/sub-01_ImageNetTraining_fmriprep_volume_native.h5        fMRIPrep re-preprocessing (figshare 21564384)
    stimuli/stimulus_ArtificialImage.tsv                           stimulus name <TAB> stimulus_id
    images/ArtificialImage/colorExpStim01_red_square.tiff          unpacked from ArtificialImage.zip
    models/VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt            unpacked from VGG_ILSVRC_19_layers.zip
    models/bvlc_reference_caffenet_generator_ILSVRC2012_Training/generator_relu7.pt

Entries whose figshare file id is not published anywhere we could check (``file_id`` None) are
found at download time by name in the article's public file list (figshare API,
``<api>/articles/<article>/files``), which also gives their size and md5; ``download`` checks both
and records the id. Sizes and sha256 sums of the other files are not published; their md5 sums
are those listed by the lab's brain-decoding-cookbook (``data/files.json``). ``download`` records
the sha256 of what it fetched in the folder's ``manifest.json``.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MIRROR_ENV = "BRAINRECON_MIRROR"
API_ENV = "BRAINRECON_FIGSHARE_API"
HOME_ENV = "BRAINRECON_HOME"

FIGSHARE_2019 = "https://ndownloader.figshare.com/files"        # article 7033577 (Shen et al. 2019)
FIGSHARE_COOKBOOK = "https://figshare.com/ndownloader/files"    # article 21564384 (brain-decoding cookbook)
FIGSHARE_API = "https://api.figshare.com/v2"                    # public file lists: <api>/articles/<id>/files
ARTICLE_2019, ARTICLE_COOKBOOK = 7033577, 21564384
PAGE_2019 = f"https://figshare.com/articles/dataset/{ARTICLE_2019}"
PAGE_COOKBOOK = f"https://figshare.com/articles/dataset/{ARTICLE_COOKBOOK}"
# The ImageNet stimulus images are not published (licence); the lab shares them on request here:
STIMULUS_REQUEST_URL = "https://forms.gle/ujvA34948Xg49jdn9"


def mirror_url(mirror: str | None = None) -> str:
    """The mirror in use: ``mirror`` if given, else ``$BRAINRECON_MIRROR``; "" for figshare."""
    return mirror if mirror is not None else os.environ.get(MIRROR_ENV, "")


def api_url(api: str | None = None) -> str:
    """The figshare API set by the user: ``api`` if given, else ``$BRAINRECON_FIGSHARE_API``; "" if
    neither (then figshare's own, :data:`FIGSHARE_API`, is used where a file list is needed)."""
    return (api if api is not None else os.environ.get(API_ENV, "")).rstrip("/")


class RegistryError(ValueError):
    """An unknown artefact name; the message lists the close ones."""


@dataclass(frozen=True)
class Artefact:
    """One published file.

    ``file_id``: the figshare file id; None: looked up by ``file`` in the file list of ``article``
    at download time. ``folder``: where it goes under the download home; ``expect``: for an archive
    (``unpack``), the files it must hold, relative to ``folder/<archive stem>/`` once unpacked;
    ``min_images``: for an archive of stimulus images, how many image files it must hold at least;
    ``kind``: what the file must hold, checked after the download (see ``download.check_content``:
    ``bdata``, ``hdf5``, ``zip``, ``torch``, ``mat``, ``tsv``; None: by the file name's suffix).
    """
    name: str
    file: str
    file_id: int | None
    base_url: str
    page: str
    folder: str
    description: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    unpack: bool = False
    expect: tuple[str, ...] = ()
    kind: str | None = None
    article: int | None = None
    min_images: int = 0

    def __post_init__(self):
        if self.file_id is None and self.article is None:
            raise ValueError(f"{self.name}: an entry without a file id needs the article whose file list has it")

    @property
    def resolved_at_download(self) -> bool:
        """Whether the figshare file id is looked up in the article's file list when downloading."""
        return self.file_id is None

    def url(self, mirror: str | None = None, file_id: int | None = None) -> str:
        """Download URL: ``<mirror>/<file>`` with a mirror (argument, else ``$BRAINRECON_MIRROR``),
        else the figshare URL of ``file_id`` (default: the entry's own id)."""
        mirror = mirror_url(mirror)
        if mirror:
            return f"{mirror.rstrip('/')}/{self.file}"
        file_id = self.file_id if file_id is None else file_id
        if file_id is None:
            raise ValueError(f"{self.name}: the file id comes from the file list of figshare article "
                             f"{self.article}; resolve it first")
        return f"{self.base_url}/{file_id}"

    @property
    def relpath(self) -> str:
        """The downloaded file, relative to the download home (``fmri/x.h5``, ``models/x.zip``)."""
        return f"{self.folder}/{self.file}"

    @property
    def unpack_dir(self) -> str:
        """Folder an archive is unpacked into, relative to the download home."""
        return f"{self.folder}/{PurePosixPath(self.file).stem}"

    def expected(self) -> list[tuple[str, ...]]:
        """The files a user gets, relative to the download home; each as its alternative names
        (an ``expect`` entry ``a|b`` is satisfied by either file)."""
        if self.unpack:
            return [tuple(f"{self.unpack_dir}/{alt}" for alt in e.split("|")) for e in self.expect]
        return [(self.relpath,)]

    def provides(self) -> list[str]:
        """Every file name (with alternatives) the artefact may provide, relative to the download home."""
        return [alt for group in self.expected() for alt in group]

    def paths(self, home: Path) -> list[Path]:
        """The provided files under ``home`` (of alternatives, the one present, else the first); for an
        archive of stimulus images, the folder it is unpacked into."""
        home = Path(home)
        if self.unpack and not self.expect:
            return [home / self.unpack_dir]
        return [next((home / a for a in group if (home / a).is_file()), home / group[0]) for group in self.expected()]


# ---------------------------------------------------------------------------------------- entries

_ORIGINAL = {  # Shen et al. 2019 preprocessed visual cortex data: (training id, test id); no checksums published
    1: (14830643, 14830631),
    2: (14830712, 14830697),
    3: (14830862, 14830856),
}
_FMRIPREP = {  # fMRIPrep volume data (native space), with the md5 sums of the lab's cookbook
    1: ((37838826, "f0aba2065e03a518681ceec65674026b"), (37838595, "7ab3fd8900a766a79e3f266ff223302a")),
    2: ((37848333, "8a66fcc107cbef220eb7f94b0737e0cb"), (37848300, "3524e5cae596160115b48ce0b9c25be7")),
    3: ((37850397, "889a3afe44c33182d1ec02d0debe2371"), (37849986, "b7ee993435fc9b27ca507d988bdc98e9")),
}


# The other experiments (file names as in the lab's releases; ids not published in any code we could
# check, so looked up in the article's file list). The fMRIPrep release has shapes and imagery but,
# as far as we could find, no letters file: letters come from the original release only.
_EXPERIMENTS = (  # (entry suffix, experiment in words, original file part, fMRIPrep file part or None)
    ("shapes", "artificial shapes (40 images, 20 presentations)", "perceptionArtificialImage", "ArtificialShapes"),
    ("letters", "letters (10 images, 12 presentations)", "perceptionLetterImage", None),
    ("imagery", "mental imagery (25 targets, 20 trials, fixation trials)", "imagery", "Imagery"),
)
_FMRIPREP_KNOWN = {  # (subject, file part): (id, md5) found in public code
    (1, "ArtificialShapes"): (37838487, "2899d192ffd55973d08d420d20a6c401"),
}
# Published stimuli (article 7033577): archives of the shape and letter images, and the stimulus
# lists (no header; stimulus name <TAB> stimulus_id). The file names on figshare are not confirmed:
# a mirror must serve them under these names.
_STIMULUS_LISTS = (("natural-training", "NaturalImageTraining", 14876741, "the 1,200 natural training images"),
                   ("natural-test", "NaturalImageTest", 14876738, "the 50 natural test images"),
                   ("shapes", "ArtificialImage", 14876798, "the 40 artificial shapes"),
                   ("letters", "LetterImage", 14876732, "the 10 letters"))
_STIMULUS_IMAGES = (("shapes", "ArtificialImage", 14876801, 40, "the 40 artificial shape images"),
                    ("letters", "LetterImage", 14876735, 10, "the 10 letter images"))


def _entries() -> list[Artefact]:
    out = []
    for s in (1, 2, 3):
        sub = f"sub-0{s}"
        for part, fid in zip(("Training", "Test"), _ORIGINAL[s]):
            out.append(Artefact(
                name=f"fmri/{sub}/perception-natural-{part.lower()}",
                file=f"{sub}_perceptionNaturalImage{part}_original_VC.h5", file_id=fid,
                base_url=FIGSHARE_2019, page=PAGE_2019, folder="fmri", kind="bdata", article=ARTICLE_2019,
                description=f"{sub} natural-image {part.lower()} fMRI, visual cortex (Shen et al. 2019)"))
        for key, words, part, _ in _EXPERIMENTS:
            out.append(Artefact(
                name=f"fmri/{sub}/{'perception-' if key != 'imagery' else ''}{key}",
                file=f"{sub}_{part}_original_VC.h5", file_id=None, article=ARTICLE_2019,
                base_url=FIGSHARE_2019, page=PAGE_2019, folder="fmri", kind="bdata",
                description=f"{sub} {words} fMRI, visual cortex (Shen et al. 2019)"))
        for part, (fid, md5) in zip(("Training", "Test"), _FMRIPREP[s]):
            out.append(Artefact(
                name=f"fmri/{sub}/fmriprep-{part.lower()}",
                file=f"{sub}_ImageNet{part}_fmriprep_volume_native.h5", file_id=fid, md5=md5,
                base_url=FIGSHARE_COOKBOOK, page=PAGE_COOKBOOK, folder="fmri", kind="bdata", article=ARTICLE_COOKBOOK,
                description=f"{sub} ImageNet {part.lower()} fMRI, fMRIPrep volume (native space)"))
        for key, words, _, part in _EXPERIMENTS:
            if part is None:
                continue
            fid, md5 = _FMRIPREP_KNOWN.get((s, part), (None, None))
            out.append(Artefact(
                name=f"fmri/{sub}/fmriprep-{key}",
                file=f"{sub}_{part}_fmriprep_volume_native.h5", file_id=fid, md5=md5, article=ARTICLE_COOKBOOK,
                base_url=FIGSHARE_COOKBOOK, page=PAGE_COOKBOOK, folder="fmri", kind="bdata",
                description=f"{sub} {words.split(' (')[0]} fMRI, fMRIPrep volume (native space)"))
    for key, stem, fid, words in _STIMULUS_LISTS:
        out.append(Artefact(
            name=f"stimuli/{key}-list", file=f"stimulus_{stem}.tsv", file_id=fid, article=ARTICLE_2019,
            base_url=FIGSHARE_2019, page=PAGE_2019, folder="stimuli", kind="tsv",
            description=f"stimulus names and ids of {words} (label map for --labels)"))
    for key, stem, fid, n, words in _STIMULUS_IMAGES:
        out.append(Artefact(
            name=f"stimuli/{key}-images", file=f"{stem}.zip", file_id=fid, article=ARTICLE_2019,
            base_url=FIGSHARE_2019, page=PAGE_2019, folder="images", unpack=True, min_images=n,
            description=f"{words}, unpacked into images/{stem}/"))
    out.append(Artefact(
        name="vgg19-caffe", file="VGG_ILSVRC_19_layers.zip", file_id=38225868,
        md5="49f4d6dbf1024f33149352dfd309dc4d",
        base_url=FIGSHARE_COOKBOOK, page=PAGE_COOKBOOK, folder="models", unpack=True, article=ARTICLE_COOKBOOK,
        description="Caffe VGG19 as a PyTorch state dict, ImageNet mean, per-channel feature SDs",
        # The lab's scripts read these three files from models/VGG_ILSVRC_19_layers/ after unzipping the
        # archive into models/: the archive most likely holds a top folder VGG_ILSVRC_19_layers/ (not
        # verified on the archive itself). Unpacking removes a single top folder, so either way works.
        expect=("VGG_ILSVRC_19_layers.pt", "ilsvrc_2012_mean.npy",
                "estimated_cnn_feat_std_VGG_ILSVRC_19_layers_ImgSize_224x224_chwise_dof1.mat")))
    out.append(Artefact(
        name="generator-relu7", file="bvlc_reference_caffenet_generator_ILSVRC2012_Training.zip",
        file_id=38361230, md5="bf9d4de43782cb019de733ed7cf84926",
        base_url=FIGSHARE_COOKBOOK, page=PAGE_COOKBOOK, folder="models", unpack=True, article=ARTICLE_COOKBOOK,
        description="image generator from CaffeNet relu7 features (Dosovitskiy & Brox 2016), latent bounds",
        # Layout as in the lab cookbook's current paths (generator_relu7.pt, act_range/3x/relu7.txt).
        # Uncertain: older lab scripts read the same bounds as act_range/3x/fc7.txt (either name is
        # accepted), an older upload of this archive exists (figshare file 38225829), and the cookbook
        # says the archive also holds the relu6 generator.
        expect=("generator_relu7.pt", "act_range/3x/relu7.txt|act_range/3x/fc7.txt")))
    return out


ARTEFACTS: dict[str, Artefact] = {a.name: a for a in _entries()}

_MODELS = ("vgg19-caffe", "generator-relu7")
_STIMULI = tuple(a.name for a in ARTEFACTS.values() if a.name.startswith("stimuli/"))


def _paper_fmri(s: int) -> tuple[str, ...]:
    """The four experiments of subject ``s`` in the original release (training, and the four test sets)."""
    return tuple(f"fmri/sub-0{s}/{k}" for k in ("perception-natural-training", "perception-natural-test",
                                                "perception-shapes", "perception-letters", "imagery"))


GROUPS: dict[str, tuple[str, ...]] = {
    **{f"paper-subject{s}": (*_paper_fmri(s), *_STIMULI, *_MODELS) for s in (1, 2, 3)},
    "paper": tuple(n for s in (1, 2, 3) for n in _paper_fmri(s)) + _STIMULI + _MODELS,
    "fmriprep": tuple(a.name for a in ARTEFACTS.values() if "/fmriprep-" in a.name),
    "models": _MODELS,
    "all": tuple(ARTEFACTS),
}
GROUP_HELP = {
    **{f"paper-subject{s}": f"sub-0{s} fMRI of the paper's four experiments (natural training + test, shapes, "
                            "letters, imagery), the stimulus lists and shape/letter images, VGG19, relu7 generator"
       for s in (1, 2, 3)},
    "paper": "the paper's fMRI of all three subjects and four experiments, stimuli, VGG19, relu7 generator",
    "fmriprep": "the fMRIPrep re-preprocessed fMRI of all three subjects (natural, shapes, imagery)",
    "models": "VGG19 and the relu7 generator",
    "all": "everything listed here",
}


def expand(names) -> list[Artefact]:
    """Artefacts for entry names, group names and name prefixes (``fmri/sub-01``), without repeats."""
    out: dict[str, Artefact] = {}
    for raw in names:
        name = str(raw).strip().strip("/")
        if name in ARTEFACTS:
            hits = [name]
        elif name in GROUPS:
            hits = list(GROUPS[name])
        else:
            hits = [k for k in ARTEFACTS if k.startswith(name + "/")] if name else []
        if not hits:
            choices = list(ARTEFACTS) + list(GROUPS) + sorted({k.rsplit("/", 1)[0] for k in ARTEFACTS if "/" in k})
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise RegistryError(f"unknown artefact {raw!r}; {hint}see the names with: brainrecon download --list")
        for k in hits:
            out.setdefault(k, ARTEFACTS[k])
    return list(out.values())


def default_home() -> Path:
    """``$BRAINRECON_HOME``, else ``$XDG_CACHE_HOME/brainrecon``, else ``~/.cache/brainrecon``
    (the same place on every platform, so that the example configs' paths hold)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "brainrecon"


def find_by_filename(filename: str) -> list[tuple[Artefact, str]]:
    """(artefact, path relative to the download home) for each artefact that provides ``filename``."""
    return [(a, rel) for a in ARTEFACTS.values() for rel in a.provides() if PurePosixPath(rel).name == filename]
