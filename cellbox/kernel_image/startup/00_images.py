# Run in every new Python kernel of this template (IPKernelApp.exec_files).
# PIL's Image.show() opens a viewer on a desktop; in a sandbox, show the image as an output
# instead. Patched lazily when PIL is first imported, so kernels that never use PIL pay nothing.
import sys as _sys


def _cellbox_patch_pil(image_module=None):
    # The module object itself when patching as it is imported: ``import PIL.Image`` there
    # fails ("cannot access submodule 'Image' of module 'PIL'": it is not bound on PIL yet).
    from IPython.display import display

    if image_module is None:
        import PIL.Image as image_module

    def _show(self, title=None, **_kwargs):
        display(self)

    image_module.Image.show = _show


class _CellboxPILHook:
    def find_spec(self, name, path=None, target=None):
        if name != "PIL.Image":
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def _exec(module):
            exec_module(module)
            try:
                _cellbox_patch_pil(module)
            except Exception:
                pass

        loader.exec_module = _exec
        return spec


if "PIL.Image" in _sys.modules:
    _cellbox_patch_pil()
else:
    _sys.meta_path.insert(0, _CellboxPILHook())
del _sys
