//! Image handling against Pillow: Lanczos resizing bit for bit, cropping, PNG metadata.

mod common;

use common::fixtures;
use flux2::image_io::RgbImage;

#[test]
fn lanczos_resize_matches_pillow_exactly() {
    let dir = fixtures().join("resize");
    let src = RgbImage::load(&dir.join("source.png")).unwrap();
    for (w, h) in [(40, 25), (130, 70), (97, 30), (33, 61), (7, 5)] {
        let want = RgbImage::load(&dir.join(format!("lanczos_{w}x{h}.png"))).unwrap();
        let got = src.resize_lanczos(w, h);
        let diffs = got.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        assert_eq!((got.width, got.height), (w, h));
        assert_eq!(diffs, 0, "{w}x{h}: {diffs} bytes differ from Pillow");
    }
}

#[test]
fn crop_tensor_roundtrip_and_png_text() {
    let src = RgbImage::load(&fixtures().join("resize/source.png")).unwrap();
    let c = src.center_crop(96, 48);
    assert_eq!((c.width, c.height), (96, 48));
    // (97-96)/2 = 0 columns and (61-48)/2 = 6 rows are cut on the left/top.
    assert_eq!(&c.data[..3], &src.data[6 * 97 * 3..6 * 97 * 3 + 3]);
    let t = c.to_tensor().unwrap();
    assert_eq!(t.shape(), &[1, 3, 48, 96]);
    let back = RgbImage::from_decoded(&t.to_vec_f32().unwrap(), 96, 48).unwrap();
    assert_eq!(back, c);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.png");
    c.save_png(&p, &[("parameters", "café 1".into()), ("unicode", "猫".into())]).unwrap();
    let reread = RgbImage::load(&p).unwrap();
    assert_eq!(reread, c);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    assert_eq!(info.uncompressed_latin1_text[0].keyword, "parameters");
    assert_eq!(info.uncompressed_latin1_text[0].text, "café 1");
    assert_eq!(info.utf8_text[0].get_text().unwrap(), "猫");
}

#[test]
fn unreadable_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.png");
    std::fs::write(&p, b"not an image").unwrap();
    let e = RgbImage::load(&p).unwrap_err().to_string();
    assert!(e.contains("x.png") && e.contains("decode"), "{e}");
    assert!(RgbImage::load(&dir.path().join("missing.png")).is_err());
}
