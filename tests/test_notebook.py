"""A plot called at the end of a Jupyter cell shows one figure (run through a real kernel with nbclient)."""

import pytest

nbformat = pytest.importorskip("nbformat")  # installed with the test extras (nbclient, ipykernel)
nbclient = pytest.importorskip("nbclient")

SETUP = """
import histoexp as hx
a = hx.datasets.synthetic(n_sections=1, random_state=0)
a.layers["bleep"] = hx.pp.expression_matrix(a) * 0.5  # a stand-in prediction next to the counts in X
"""


def _figures(cell) -> int:
    """Images a cell displays: display_data and execute_result outputs with a PNG."""
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def test_cell_ending_in_plot_call_displays_once(tmp_path):
    cells = [
        SETUP,
        'hx.pl.gene_map(a, "gene000", layer="bleep")',
        'hx.pl.gene_map(a, ["gene000", "gene001"], layer="bleep", vmax="p99")',
        'hx.tl.spatial_domains(a, layer="bleep", key_added="d")\nhx.pl.spatial_domains(a, "d", compare=None)',
        'fig = hx.pl.gene_map(a, "gene000", layer="bleep", return_fig=True)\nfig.axes[0].get_title()',
        "import squidpy, scanpy",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    counts = [_figures(c) for c in nb.cells]
    # the plot calls return None: the inline backend shows the figure once, no Figure repr shows it again
    assert counts[1:4] == [1, 1, 1], counts
    assert not any(o.output_type == "execute_result" for c in nb.cells[1:4] for o in c.outputs)
    # return_fig=True: the open figure is returned, not shown; the inline backend shows it once at the cell's end
    assert [o.output_type for o in nb.cells[4].outputs].count("execute_result") == 1 and counts[4] == 1
    # nothing on stderr: no IProgress notice from tqdm, no docrep SyntaxWarning, no squidpy INFO lines
    stderr = [o.get("text", "") for c in nb.cells for o in c.outputs if o.get("name") == "stderr"]
    assert stderr == [], stderr
