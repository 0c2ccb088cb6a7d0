// CarouselDisplay: the generated images, newest first, one shown large.
// The page hands results in through the seed's `CarouselDisplay.addData(...)`
// (called on the mounted instance through a ref).
//
// Preact 11 passes `ref` to components as an ordinary prop instead of pointing
// it at the instance, so this class points the ref at itself while mounted.

import { Component } from "preact";
import { html } from "htm/preact";

function setRef(ref, value) {
  if (typeof ref === "function") ref(value);
  else if (ref) ref.current = value;
}

/**
 * The key of an item among the thumbnails: its image URL, unique per image (the
 * daemon names images at random). Not `uid`, the task's creation time in ms,
 * which two tasks may share, and which all images of one task share.
 */
export function itemKey(item) {
  return item.image;
}

export class CarouselDisplay extends Component {
  constructor(props) {
    super(props);
    this.state = { items: [], index: 0 };
    this.showPrevious = () => this.show(this.state.index - 1);
    this.showNext = () => this.show(this.state.index + 1);
  }

  componentDidMount() {
    setRef(this.props.ref, this);
  }

  componentWillUnmount() {
    setRef(this.props.ref, null);
  }

  /**
   * Add one generated image and show it.
   * @param {{image: string, prompt?: string, seed?: number, name?: string, workflow?: string,
   *          description?: string, uid?: number, taskId?: string}} item
   */
  addData(item) {
    this.setState(({ items }) => ({ items: [item, ...items], index: 0 }));
  }

  show(index) {
    const count = this.state.items.length;
    if (count === 0) return;
    this.setState({ index: (index + count) % count });
  }

  render(_props, { items, index }) {
    if (items.length === 0) {
      return html`<section class="carousel carousel--empty" aria-label="Generated images">
        <p class="carousel__placeholder">Generated images appear here.</p>
      </section>`;
    }
    const item = items[index];
    const title = item.name || item.prompt || "Generated image";
    return html`
      <section class="carousel" aria-label="Generated images">
        <figure class="carousel__figure">
          <img class="carousel__image" src=${item.image} alt=${item.prompt || title} />
          <figcaption class="carousel__caption">
            <strong class="carousel__title">${title}</strong>
            ${item.prompt && item.prompt !== title
              ? html`<span class="carousel__prompt">${item.prompt}</span>`
              : null}
            ${item.seed !== undefined && item.seed !== null
              ? html`<span class="carousel__seed">seed ${String(item.seed)}</span>`
              : null}
          </figcaption>
        </figure>
        <div class="carousel__nav">
          <button type="button" onClick=${this.showPrevious} disabled=${items.length < 2}>‹ Newer</button>
          <span class="carousel__count">${index + 1} / ${items.length}</span>
          <button type="button" onClick=${this.showNext} disabled=${items.length < 2}>Older ›</button>
        </div>
        <ol class="carousel__thumbs">
          ${items.map(
            (it, i) => html`<li key=${itemKey(it)}>
              <button
                type="button"
                class=${i === index ? "carousel__thumb carousel__thumb--current" : "carousel__thumb"}
                aria-label=${`Show ${it.name || it.prompt || "image"}`}
                onClick=${() => this.show(i)}
              >
                <img src=${it.image} alt="" />
              </button>
            </li>`,
          )}
        </ol>
      </section>
    `;
  }
}
