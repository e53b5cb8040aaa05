// FieldKind<T>::value: the kind letter by which cuflash/params.py describes a parameter field
// of type T. The static_asserts that compile.py appends to every program compare the two.
#pragma once

template <class T>
struct FieldKind;
template <class T>
struct FieldKind<T*> {
    static constexpr char value = 'P';
};
template <>
struct FieldKind<long long> {
    static constexpr char value = 'q';
};
template <>
struct FieldKind<int> {
    static constexpr char value = 'i';
};
template <>
struct FieldKind<unsigned> {
    static constexpr char value = 'I';
};
template <>
struct FieldKind<float> {
    static constexpr char value = 'f';
};
