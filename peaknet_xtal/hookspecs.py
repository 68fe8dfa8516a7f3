"""Every extension point of peaknet-xtal, in one place.

A plugin is a module (or object) with functions named like the specs below and decorated with
``peaknet_xtal.hookspecs.hookimpl`` (``from peaknet_xtal.hookspecs import hookimpl``).
Third-party plugins are found through the ``peaknet_xtal`` entry-point group; the built-in
sources, writers and model families (``peaknet_xtal.builtin``) register through these same hooks,
so a plugin has exactly the powers the built-ins have.

How the registry (:mod:`peaknet_xtal.registry`) treats plugins, which is part of the contract:

* Order: the built-ins' items come first, then each plugin's in the order the plugins were
  loaded.  Where order matters (a source found by ``sniff``), a built-in is asked first, so a
  plugin cannot take over a file a built-in reads; it claims what no built-in does.  Every
  command that takes inputs (``peaknet2cxi``, ``peaknet-show``, the data engine) asks the
  plugins' ``sniff`` about an input the built-ins do not claim or fail to read: an HDF5 file
  without the CXI reader's datasets, a folder, a name that is not a file (passed as typed),
  on the command line or on a line of a list file alike.
* A plugin that fails to load (an import error, a hook pluggy rejects) is skipped with one
  warning naming its entry point and distribution: a broken plugin an input does not use does
  not stop work on the inputs that need only the built-ins.  Asking for something only it would
  have provided (a source type, writer or model by name) is then an error that names it again.
  An input no loaded source claims is an error that names the plugins that failed to load.
  ``PEAKNET_NO_PLUGINS=1`` loads no third-party plugin at all.
* A plugin that loads but implements a hook no spec here names (a misspelt
  ``peaknet_source_type``), or no hook at all (functions without ``@hookimpl``, an entry point
  aimed at another module), is warned about once, naming it and the unknown hook; its valid
  hooks are used.
* A hook that raises, or returns anything but a list (or tuple) of items with the attributes
  documented below, is an error (:class:`peaknet_xtal.registry.PluginError`) naming the plugin
  and what the hook must return.  So is a name two plugins (or a plugin and a built-in) both
  register: the error names both.
* A ``sniff`` that raises is taken as "not mine"; the registry warns once per plugin.
* A source's ``open`` that returns no ``FrameSource``, or a source that yields anything but a
  :class:`~peaknet_xtal.types.Frame`, is a PluginError naming the plugin, its source type and
  what it gave instead.

The objects the hooks return follow two small protocols, documented here too:

``FrameSource``
    ``name: str`` (its source type's name: errors name the plugin by it); ``__iter__()`` yields
    :class:`peaknet_xtal.types.Frame`; ``__len__()`` the number of frames, where it cannot be
    known before the frames are read (a live stream, an LCLS run) it raises ``TypeError``, and
    progress then counts without a total; ``close()``.  Frames must carry a stable
    ``(source, event)`` key, which is what makes resumable runs and exactly-once output
    possible.  Optional: ``frame_at(event: str) -> Frame``, random access by the event of a key
    (the data engine reads the frames an indexing result names this way); a source without it
    is read in order until the event comes up (:func:`peaknet_xtal.registry.frame_at`).

    A frame's ``panels`` are float32 2-D arrays (``masks``: bool, True = good pixel, or None).
    The ``meta`` keys the finding pipeline reads, each optional: ``wavelength_A`` (the photon
    wavelength in Angstrom: each peak's 1/d, the photon energy CXI files and streams record,
    and a geometry's ``adu_per_eV`` gain), ``adu_per_photon`` (the detector gain for the shot
    noise in each peak's SNR; without it the geometry's, else one measured from the
    background) and ``dtype`` (the type the data were stored as, e.g. ``"uint16"``, where they
    were converted to float32: integer data mark gaps and bad pixels by it).  Keys beginning
    ``h5_`` are the CXI reader's (linking output to its input file): leave them unset.

``PeakWriter``
    ``name: str``; ``write(result: FrameResult)``; ``close()`` which finalises the output
    atomically (nothing half-written is left under the final name); ``done_keys()`` returns the
    ``(source, event)`` keys already written by an earlier, interrupted run so they can be skipped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Sequence

PROJECT = "peaknet_xtal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def peaknet_source_types() -> Sequence[Any]:
    """Return the frame-source types this plugin provides.

    Each item is a ``SourceType`` with ``name: str``, ``description: str``,
    ``sniff(path: str) -> bool`` (can this source open ``path``? must be cheap and never raise:
    it is asked about every input a built-in does not claim or cannot read, including folders,
    missing files, HDF5 files and non-file names such as ``zmq://host:5555`` or an LCLS run,
    given as the user typed them), and ``open(path: str, **options) -> FrameSource``.

    ``open`` must take any keyword option and ignore those it does not know.  What it receives:
    ``geometry`` (``peaknet2cxi -g`` passes a :class:`~peaknet_xtal.formats.geometry.Geometry`,
    nothing without ``-g``; ``peaknet-show --geometry`` a ``.geom`` path; the data engine a
    Geometry or None: :func:`peaknet_xtal.builtin.options.geometry_option` makes any of them a
    Geometry or None);
    and from ``--source-option KEY=VALUE`` (``peaknet2cxi``, ``peaknet-show`` and
    ``stream2labels`` alike: :mod:`peaknet_xtal.source_option`) the options the type declares
    in its optional ``options: tuple[str, ...]`` (their names; each value the string typed; a
    key no registered type declares is refused).  A Python caller passes what it likes
    (``registry.open_source(path, kind, **options)``, ``run_pipeline``'s ``source_options``).
    ``peaknet_xtal.builtin.sources.SourceType`` is such a class.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def peaknet_writer_types() -> Sequence[Any]:
    """Return the peak-writer types this plugin provides.

    Each item is a ``WriterType`` with ``name: str``, ``description: str``, ``suffix: str``
    (the file suffix it writes, e.g. ``".cxi"``) and ``open(path: str, **options) -> PeakWriter``.
    ``open`` must take any keyword option and ignore those it does not know: a run hands one
    set of options to whichever writer it names (``run_pipeline``'s ``writer_options``, with
    ``geometry``, a Geometry or None, where the run has one).  Writers are opened by name from
    Python (``registry.open_writer(name, path, **options)``, ``run_pipeline({"writer": name})``);
    ``peaknet2cxi`` writes its own CXI files and, with ``--stream``, the built-in stream writer.
    ``peaknet_xtal.builtin.writers.WriterType`` is such a class.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def peaknet_model_families() -> Sequence[Any]:
    """Return the model architectures (families) this plugin provides, with their named sizes.

    Each item is a ``ModelFamily`` (``peaknet_xtal.model.zoo.ModelFamily`` is such a class) with
    ``name: str`` (the family, stored as ``config["family"]`` beside saved weights, so a saved
    model names the plugin it needs), ``description: str``, ``build(**config) -> torch.nn.Module``
    and ``sizes: Mapping[str, Mapping[str, Any]]``, the named sizes (model names) and the
    ``build`` keyword arguments of each.  Model names are unique across all families.

    ``create_model(name, **overrides)`` calls ``build(**size, **overrides, name=name)``;
    ``build`` must accept ``name`` (and may ignore it) and return a ``torch.nn.Module``.  The
    model must carry ``model.config``: a JSON-serialisable dict with ``"family"`` that ``build``
    rebuilds the same architecture from (``build_from_config`` passes it back without
    ``family``), which is what ``save_model``/``load_model`` store and read; record ``"name"`` in
    it too (fine-tuning reads which model a weights file is from it), and leave the key
    ``"extra"`` alone (``save_model`` keeps training notes there).  ``model(image, mask=None)``
    takes raw ``(B, 1, H, W)`` float images (``mask``: the same shape, bool, True = good pixel)
    and returns ``(B, 2, H, W)`` logits, channel 1 "peak", of the input's height and width: what
    training, distillation and the finding engine feed it and read back.  Training feeds
    ``data.crop``-sized squares as they are (a crop that is not a multiple of ``pad_multiple``,
    and that the model's output does not match, is refused before any data are read); the
    finding engine whole panels (or tiles) of any size, padded as ``pad_multiple`` says.

    Optional, read where present (the defaults are what a model without them gets):

    * ``pad_multiple: int`` (class or instance attribute; default 1): the finding engine pads
      each tile's height and width with masked zero pixels up to a multiple of it and crops the
      output back.  A network that downsamples by ``2**k`` sets ``2**k`` (or pads and crops
      inside ``forward``, as PeakNet does): its output must then match any input whose sides
      are multiples of it.
    * ``peak_logit(image, mask=None) -> (B, 1, H, W)``: the peak logit minus the background one.
      The engine then takes its peak probabilities as ``sigmoid`` of it instead of softmax of
      ``model(...)``'s channel 1 (``predict_logits`` still calls ``model`` itself).
    * ``config["input_norm"]``: ``"local"`` makes the engine call ``normalise(image, valid) ->
      image`` (``valid``: bool, same shape) once per whole panel before tiling, then ``model``
      (or ``peak_logit``) with ``normalised=True``, which they must accept; anything else, or
      none, hands them raw pixels, which they normalise themselves.
    * ``config["num_classes"]`` (default 2): how many logit channels ``predict_logits`` gives
      panels the model never ran on (none with a good pixel).

    A plugin's model is checked against this where it is made (``create_model``,
    ``build_from_config``, ``load_model``, peaknet-train's start check) and, given as a weights
    file, by every host before any work (``weights_io.check_model``): no ``config``, a
    ``build`` refusing ``name``, or a forward on a probe image whose sides are odd multiples of
    ``pad_multiple`` (33 x 35 without one) that raises or returns another size is a
    ``PluginError`` naming the family and the plugin.  Prefer importing torch inside the hook or
    ``build``: every command loads every plugin, one that only looks up a source or writer too.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations
