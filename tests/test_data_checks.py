"""Reading labelled data: bad label values get an error naming the file, frame and label."""

import numpy as np
import pytest
from ase import Atoms

from cartlorem.data import read_dataset

FRAME = ('2\nLattice="5 0 0 0 5 0 0 0 5" Properties=species:S:1:pos:R:3:REF_forces:R:3 {info} pbc="T T T"\n'
         "Cu 0 0 0 0 0 0\nCu 2.5 0 0 0 0 0\n")


@pytest.mark.parametrize("info, label", [
    ("REF_energy=T", "REF_energy"),            # a boolean read as 1.0 eV
    ("REF_energy=abc", "REF_energy"),          # text
    ("REF_energy=1.0 REF_stress=\"a b c d e f\"", "REF_stress"),
])
def test_non_numeric_labels_are_refused_naming_the_label(tmp_path, info, label):
    path = tmp_path / "bad.xyz"
    path.write_text(FRAME.format(info=info))
    with pytest.raises(ValueError, match=rf"bad\.xyz, frame 0: .*{label}.*not a number"):
        read_dataset(path, 3.0, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")


def test_non_numeric_charge_labels_are_refused():
    a = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    a.info.update(energy_label=1.0, dipole=[True, False, True])
    a.arrays["forces_label"] = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"frame 0: dipole label .*not a number"):
        read_dataset([a], 3.0, energy_key="energy_label", forces_key="forces_label")


def test_numeric_labels_still_read(tmp_path):
    path = tmp_path / "good.xyz"
    path.write_text(FRAME.format(info='REF_energy=-3 REF_stress="1 2 3 4 5 6"'))
    (g,) = read_dataset(path, 3.0, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    assert float(g.energy) == -3.0 and float(g.stress[0, 1, 2]) == 4.0
