// PreviewThumbnail: the newest live preview of a running task, updated in place.
//
// A new preview URL is loaded off-screen first and swapped in only once it has
// loaded, so the picture never blanks or flickers between versions. A load
// that finishes is shown unless a newer one already is: previews that come
// faster than they load (a slow link) still show, the newest loaded so far. A
// preview that fails to load leaves the last good one in place. The box has a
// fixed size (CSS), so versions of any size never move the layout. Nothing is
// rendered until a first preview has loaded, or when `url` is empty.
//
// Props:
//   url    the preview URL (`progress.preview.url`, made page-relative), or null
//   alt    the text alternative
//   Image  image constructor for the off-screen load (default: the browser's), for tests

import { Component } from "preact";
import { html } from "htm/preact";

export class PreviewThumbnail extends Component {
  constructor(props) {
    super(props);
    this.state = { src: null };
    this._loading = new Set(); // off-screen images not loaded yet
    this._asked = 0; // loads started
    this._shown = 0; // the number of the load on screen
  }

  componentDidMount() {
    this._load(this.props.url);
  }

  componentDidUpdate(previous) {
    if (previous.url !== this.props.url) this._load(this.props.url);
  }

  componentWillUnmount() {
    this._abandon();
  }

  _load(url) {
    if (!url) {
      this._abandon();
      return;
    }
    const ImageCtor = this.props.Image ?? globalThis.Image;
    const image = new ImageCtor();
    const number = ++this._asked;
    this._loading.add(image);
    image.onload = () => {
      this._loading.delete(image);
      if (number < this._shown) return; // a newer preview is already on screen
      this._shown = number;
      this.setState({ src: url });
    };
    image.onerror = () => {
      this._loading.delete(image);
    };
    image.src = url;
  }

  _abandon() {
    for (const image of this._loading) {
      image.onload = null;
      image.onerror = null;
    }
    this._loading.clear();
  }

  render({ url, alt }, { src }) {
    if (!url || !src) return null;
    return html`<img class="preview-thumbnail" src=${src} alt=${alt} decoding="async" />`;
  }
}
