# Run in every new Python kernel of this template (IPKernelApp.exec_files).
# Structured data next to the rendered outputs, in E2B's result formats:
#   e2b/chart  a matplotlib Figure's chart (type, title, axes, elements with their values),
#              extracted by e2b-charts, E2B's own extractor;
#   e2b/data   a pandas DataFrame as {column: [values]} (up to 200,000 values).
# Matched by module and class name, so kernels that never import matplotlib or pandas pay
# nothing. A failing extraction leaves the format out; it never turns into an error output.


def _cellbox_register_e2b_formats():
    import enum
    import math
    import sys

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName

    shell = get_ipython()
    if shell is None:
        return

    def _json_value(value):
        # JSON has no NaN/inf (jupyter_client refuses them), no timestamps, no numpy scalars.
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, dict):
            return {str(k): _json_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_json_value(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "isoformat"):
            return value.isoformat()
        item = getattr(value, "item", None)  # numpy scalars
        if callable(item):
            return _json_value(item())
        return str(value)

    def _chart(figure):
        try:
            from e2b_charts import chart_figure_to_chart

            chart = chart_figure_to_chart(figure)
            # model_dump(mode="json") fails on the numpy ticks of a date axis
            return _json_value(chart.model_dump()) if chart is not None else None
        except Exception:
            return None

    def _data(frame):
        # Sent with every display of the frame: a huge one would swamp the output stream.
        if frame.size > 200_000:
            return None
        try:
            columns = frame.to_dict(orient="list")
            return {str(k): [_json_value(v) for v in values] for k, values in columns.items()}
        except Exception:
            return None

    class _E2BFormatter(BaseFormatter):
        # Not type_printers: IPython's select_figure_formats (run when the inline backend
        # starts) pops Figure from every formatter. An isinstance check against the class, if
        # its module was imported at all (else obj cannot be one), imports nothing either.
        print_method = ObjectName("_repr_cellbox_none_")  # no object has it

        def __call__(self, obj):
            module = sys.modules.get(self._cellbox_module)
            cls = getattr(module, self._cellbox_class, None) if module is not None else None
            if cls is None or not isinstance(obj, cls):
                return None
            return self._cellbox_printer(obj)

    for mime, module, name, printer in [
        ("e2b/chart", "matplotlib.figure", "Figure", _chart),
        ("e2b/data", "pandas", "DataFrame", _data),
    ]:
        formatter = _E2BFormatter(parent=shell.display_formatter)
        formatter.format_type = mime
        formatter._cellbox_module, formatter._cellbox_class, formatter._cellbox_printer = module, name, printer
        shell.display_formatter.formatters[mime] = formatter


_cellbox_register_e2b_formats()
del _cellbox_register_e2b_formats
