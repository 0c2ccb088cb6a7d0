// PreviewThumbnail: the newest live preview of a running task, updated in place.
//
// A new preview URL is loaded off-screen first and swapped in only once it has
// loaded, so the picture never blanks or flickers between versions; a URL that
// arrives while another is loading wins, and the older load is abandoned. A
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
    this._pending = null;
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
    this._abandon();
    if (!url) return;
    const ImageCtor = this.props.Image ?? globalThis.Image;
    const image = new ImageCtor();
    this._pending = image;
    image.onload = () => {
      if (this._pending !== image) return;
      this._pending = null;
      this.setState({ src: url });
    };
    image.onerror = () => {
      if (this._pending === image) this._pending = null;
    };
    image.src = url;
  }

  _abandon() {
    if (this._pending) {
      this._pending.onload = null;
      this._pending.onerror = null;
      this._pending = null;
    }
  }

  render({ url, alt }, { src }) {
    if (!url || !src) return null;
    return html`<img class="preview-thumbnail" src=${src} alt=${alt} decoding="async" />`;
  }
}
