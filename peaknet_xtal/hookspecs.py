"""Every extension point of peaknet-xtal, in one place.

A plugin is a module (or object) with functions named like the specs below and decorated with
``peaknet_xtal.hookimpl``.  Third-party plugins are found through the ``peaknet_xtal`` entry-point
group; the built-in sources, writers and model families (``peaknet_xtal.builtin``) register
through these same hooks, so a plugin has exactly the powers the built-ins have.

How the registry (:mod:`peaknet_xtal.registry`) treats plugins, which is part of the contract:

* Order: the built-ins' items come first, then each plugin's in the order the plugins were
  loaded.  Where order matters (a source found by ``sniff``), a built-in is asked first, so a
  plugin cannot take over a file a built-in reads; it claims what no built-in does.
* A plugin that fails to load (an import error, a hook pluggy rejects) is skipped with one
  warning naming its entry point and distribution: a broken plugin an input does not use does
  not stop work on the inputs that need only the built-ins.  Asking for something only it would
  have provided (a source type, writer or model by name) is then an error that names it again.
  ``PEAKNET_NO_PLUGINS=1`` loads no third-party plugin at all.
* A hook that raises, or returns anything but a list (or tuple) of items with the attributes
  documented below, is an error (:class:`peaknet_xtal.registry.PluginError`) naming the plugin
  and what the hook must return.  So is a name two plugins (or a plugin and a built-in) both
  register: the error names both.
* A ``sniff`` that raises is taken as "not mine"; the registry warns once per plugin.

The objects the hooks return follow two small protocols, documented here too:

``FrameSource``
    ``name: str``; ``__iter__()`` yields :class:`peaknet_xtal.types.Frame`;  ``__len__()`` the
    number of frames when known; ``close()``.  Frames must carry a stable ``(source, event)``
    key, which is what makes resumable runs and exactly-once output possible.  Optional:
    ``frame_at(event: str) -> Frame``, random access by the event of a key (the data engine
    reads the frames an indexing result names this way); a source without it is read in order
    until the event comes up (:func:`peaknet_xtal.registry.frame_at`).

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
    it is asked about every input a built-in does not claim, including folders, missing files and
    non-file names such as ``sim:`` or an LCLS run), and ``open(path: str, **options) ->
    FrameSource``.  Options are source specific (``geometry`` for CXI/HDF5, ``count``/``seed``
    for simulated frames, ...); unknown options are ignored.
    ``peaknet_xtal.builtin.sources.SourceType`` is such a class.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def peaknet_writer_types() -> Sequence[Any]:
    """Return the peak-writer types this plugin provides.

    Each item is a ``WriterType`` with ``name: str``, ``description: str``, ``suffix: str``
    (the file suffix it writes, e.g. ``".cxi"``) and ``open(path: str, **options) -> PeakWriter``.
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
    ``data.crop``-sized squares as they are; the finding engine whole panels (or tiles) of any
    size, padded as ``pad_multiple`` says.

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
    ``build_from_config``, ``load_model``, peaknet-train's start check): no ``config``, a
    ``build`` refusing ``name``, or a forward on a probe image whose sides are odd multiples of
    ``pad_multiple`` (33 x 35 without one) that raises or returns another size is a
    ``PluginError`` naming the family and the plugin.  Prefer importing torch inside the hook or
    ``build``: every command loads every plugin, one that only looks up a source or writer too.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations
