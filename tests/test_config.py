from pathlib import Path

import pytest

from pipeline.config import StationConfig, from_dict, load_config, load_station
from pipeline.errors import ConfigError


def test_yrs_station_loads():
    st = load_station("yrs")
    assert (st.lat, st.lon) == (78.92, 11.93)
    assert st.wavelength_nm == 557.7
    assert (st.raw_size, st.crop_size, st.cadence_s) == (512, 440, 10.0)
    assert st.filename_pattern == "N%Y%m%dG%H%M%S"
    assert st.mlt.method == "offset" and st.mlt.offset_hours == 3.0


def test_themis_station_loads():
    st = load_station("themis_gill")
    assert st.raw_size == 256 and st.time_source == "pgm_header"


def test_unknown_station_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown station 'nowhere'.*yrs"):
        load_station("nowhere")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "st.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    p = _write(tmp_path, "name: x\ncode: x\nlat: 1\nlon: 2\ncrop_sise: 3\n")
    with pytest.raises(ConfigError, match=r"st\.yaml.*unknown key 'crop_sise'.*crop_size"):
        load_config(StationConfig, p)


def test_bad_literal_names_allowed_values(tmp_path):
    p = _write(tmp_path, "name: x\ncode: x\nlat: 1\nlon: 2\nmlt: {method: igrf}\n")
    with pytest.raises(ConfigError, match=r"mlt\.method.*'igrf'.*'offset', 'aacgm'"):
        load_config(StationConfig, p)


def test_wrong_type_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match=r"lat: expected a number"):
        load_config(StationConfig, _write(tmp_path, "name: x\ncode: x\nlat: north\nlon: 2\n"))
    with pytest.raises(ConfigError, match=r"lon: required key is missing"):
        load_config(StationConfig, _write(tmp_path, "name: x\ncode: x\nlat: 1\n"))


def test_validate_hook_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="crop_size .* must not exceed raw_size"):
        from_dict(StationConfig, {"name": "x", "code": "x", "lat": 1, "lon": 2, "crop_size": 600})
    with pytest.raises(ConfigError, match="stretch_high .4000. is above the 8-bit maximum 255"):
        from_dict(StationConfig, {"name": "x", "code": "x", "lat": 1, "lon": 2, "bit_depth": 8})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(StationConfig, _write(tmp_path, "name: [unclosed\n"))


def test_scaled_geometry():
    st = load_station("yrs").scaled(64)
    assert st.raw_size == 64 and st.crop_size == 55
    assert st.mask_radius == pytest.approx(27.5)
    assert st.optical_centre == pytest.approx((258 / 8, 254 / 8))


def test_resolve_station_prefers_given_then_the_sets_own_then_fallback(tmp_path):
    from pipeline.config import dump_yaml, resolve_station

    assert resolve_station(None, tmp_path).code == "yrs"
    (tmp_path / "calib").mkdir()
    dump_yaml(load_station("yrs").scaled(64), tmp_path / "calib" / "station.yaml")
    assert resolve_station(None, tmp_path).raw_size == 64
    assert resolve_station("themis_gill", tmp_path).code == "gill"
    assert resolve_station(None, tmp_path / "nowhere", "themis_gill").code == "gill"
    recorded = {"name": "x", "code": "x", "lat": 1.0, "lon": 2.0}
    assert resolve_station(None, None, recorded).code == "x"


@pytest.mark.parametrize("extra", ["crop_size: 600", "alt: 3"])
def test_top_level_errors_have_one_colon(tmp_path, extra):
    p = _write(tmp_path, f"name: x\ncode: x\nlat: 1\nlon: 2\n{extra}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(StationConfig, p)
    assert f"{p}: " in str(exc.value) and "::" not in str(exc.value)
