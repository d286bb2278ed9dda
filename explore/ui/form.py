"""A tab's run options as Gradio components, made from the Recipe's definitions, and the one place where form
values become a Recipe and input errors become messages for the page.

    form = Form(ctx)
    seed = form.widget("seed")                                  # the component its Option describes
    fn, inputs = form.event(handler, ["model", "seed", preview_every, session])
    button.click(fn, inputs, outputs)                           # handler(recipe, preview_every, session)

Strings in an event's input list are recipe fields; components are passed on to the handler as they are.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import gradio as gr

from explore.outputs import SampleFileError
from explore.recipe import Recipe, Whole, applies, defaults_of, options_of, sampler_option_names
from explore.samplers import SAMPLERS, sampler_defaults
from explore.ui import inputs
from explore.ui.context import AppContext, class_index, optional
from explore.validate import InputError
from explore.zoo import CheckpointError

# errors whose message is written for the user (it names the field and what is accepted)
INPUT_ERRORS = (InputError, CheckpointError, SampleFileError)


def page_errors(fn: Callable) -> Callable:
    """`fn` (a function or a generator function) with input errors shown on the page as they are worded."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except INPUT_ERRORS as err:
                raise gr.Error(str(err)) from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except INPUT_ERRORS as err:
            raise gr.Error(str(err)) from None
    return call


COMPONENTS = {"slider": inputs.Slider, "number": inputs.Number, "dropdown": inputs.Dropdown, "radio": inputs.Radio,
              "checkbox": gr.Checkbox, "textbox": gr.Textbox}


class Form:
    """The components of one tab's run options, by recipe field."""

    def __init__(self, ctx: AppContext, recipe_type=Recipe):
        self.ctx, self.recipe_type = ctx, recipe_type
        self.options = options_of(recipe_type)
        self.components: dict[str, gr.components.Component] = {}
        self.first_sampler = defaults_of(recipe_type)["sampler"]  # the sampler the tab shows first

    def widget(self, name: str, **overrides) -> gr.components.Component:
        """The component the option's definition describes (`overrides`: choices, value, layout, ...)."""
        widget = self.options[name].widget
        default = defaults_of(self.recipe_type).get(name)
        if name in sampler_option_names(self.recipe_type):  # shown for the tab's first sampler, at its default
            takes = sampler_defaults(self.first_sampler)
            default = takes.get(name, default)
            overrides = {"visible": name in takes, **overrides}
        kwargs: dict[str, Any] = {"label": widget.label}
        if widget.info:
            kwargs["info"] = widget.info
        if widget.kind == "slider":
            kwargs.update(minimum=widget.low, maximum=widget.high, step=widget.step, value=default)
        elif widget.kind == "number":
            kwargs.update(minimum=widget.low, maximum=widget.high, value=default,
                          precision=0 if isinstance(self.options[name].kind, Whole) else None)
        elif widget.kind in ("dropdown", "radio"):
            choices = widget.choices or getattr(self.options[name].kind, "options", lambda: None)()
            kwargs.update(choices=choices, value=default)
        else:
            kwargs["value"] = default
        if name == "karras":
            kwargs["interactive"] = SAMPLERS[self.first_sampler].karras
        component = COMPONENTS[widget.kind](**{**kwargs, **overrides})
        if name == "sampler":
            self.first_sampler = component.value
        self.components[name] = component
        return component

    # --- sampler-dependent options ------------------------------------------------------------------

    def sampler_outputs(self) -> list[gr.components.Component]:
        """The components whose visibility or value follow the sampler: its options, then Karras."""
        names = [*sampler_option_names(self.recipe_type), "karras"]
        return [self.components[name] for name in names if name in self.components]

    def sampler_changed(self, sampler: str):
        """Show the sampler's own options at its defaults, hide the others; Karras only where it applies."""
        takes = sampler_defaults(sampler) if sampler in SAMPLERS else {}
        updates = [gr.update(visible=name in takes, **({"value": takes[name]} if takes.get(name) is not None else {}))
                   for name in sampler_option_names(self.recipe_type) if name in self.components]
        if "karras" in self.components:
            karras = sampler in SAMPLERS and SAMPLERS[sampler].karras
            updates.append(gr.update(interactive=True) if karras else gr.update(interactive=False, value=False))
        return tuple(updates) if len(updates) != 1 else updates[0]

    # --- form values -> Recipe ----------------------------------------------------------------------

    def recipe(self, values: dict[str, Any], allow_random: bool = True, **fixed) -> Recipe:
        """A validated Recipe from form values (field -> component value) and `fixed` values. A blank value, a
        field the form does not show and an option that does not apply (eta for ddpm, Karras for DDIM, a
        classifier scale without a classifier, CFG on a model without a null class) keep their defaults."""
        model = values.get("model")
        if not model:
            raise InputError("Choose a model.")
        info = self.ctx.info(model)
        clean = {**values, "model": model, **fixed}
        if "classifier" in values:
            clean["classifier"] = optional(values["classifier"])
            self._check_classifier(info, clean["classifier"])
        if "class_label" in values:  # an unconditional model guided towards a class takes the classifier's classes
            classes = self.ctx.info(clean["classifier"]) if info.num_labels is None and clean.get("classifier") \
                else info
            clean["class_label"] = class_index(classes, values["class_label"], allow_random)
        if info.null_class is None:
            clean.pop("cfg_scale", None)
        caps = self.ctx.registry.caps
        parsed = {}
        for name, opt in self.options.items():
            if clean.get(name) is None or not applies(self.recipe_type, name, clean):
                continue
            parsed[name] = opt.kind.parse(name, clean[name], caps)
        recipe = self.recipe_type(**parsed)
        recipe.validate(caps)
        return recipe

    def _check_classifier(self, info, classifier: str | None) -> None:
        """A guidance classifier must see the model's image size and share its classes."""
        if classifier is None:
            return
        c = self.ctx.info(classifier)
        if c.kind != "classifier":
            raise InputError(f"classifier: {classifier} is a {c.kind} model, not a noisy classifier for guidance.")
        if c.image_size != info.image_size or (info.num_labels is not None and c.num_labels != info.num_labels):
            raise InputError(f"classifier: {classifier} ({c.image_size} px, {c.num_labels} classes) does not fit "
                             f"{info.name} ({info.image_size} px, {info.num_labels} classes).")

    def handler(self, handler: Callable, inputs: Sequence[str], allow_random: bool = True, **fixed) -> Callable:
        """A function of the form's values, in the order of `inputs` (or by name; None = the default), that builds
        the Recipe here and calls handler(recipe, *others). `inputs` names recipe fields and the handler's other
        parameters, in the order the API takes them (the API names its parameters after them). Input errors
        become page messages."""
        fields = [name for name in inputs if name in self.options]
        others = [name for name in inputs if name not in self.options]
        params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in inputs]
        params += list(inspect.signature(handler).parameters.values())[1 + len(others):]  # e.g. progress
        signature = inspect.Signature(params)

        def split(args: tuple, kwargs: dict) -> tuple[Recipe, list, dict]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = bound.arguments
            recipe = self.recipe({name: values[name] for name in fields}, allow_random, **fixed)
            rest = {name: value for name, value in values.items() if name not in inputs}
            return recipe, [values[name] for name in others], rest

        if inspect.isgeneratorfunction(handler):
            def fn(*args, **kwargs):
                recipe, others_values, rest = split(args, kwargs)
                yield from handler(recipe, *others_values, **rest)
        else:
            def fn(*args, **kwargs):
                recipe, others_values, rest = split(args, kwargs)
                return handler(recipe, *others_values, **rest)
        fn.__signature__ = signature
        fn.__name__ = fn.__qualname__ = getattr(handler, "__name__", "run")
        fn.__doc__ = handler.__doc__
        return page_errors(fn)

    def event(self, handler: Callable, inputs: Sequence[str], components: dict[str, gr.components.Component],
              allow_random: bool = True, **fixed) -> tuple[Callable, list]:
        """(fn, input components) for an event: `handler` as above; the form's components for the recipe
        fields, `components` for the handler's other parameters."""
        fn = self.handler(handler, inputs, allow_random, **fixed)
        return fn, [self.components[name] if name in self.options else components[name] for name in inputs]
